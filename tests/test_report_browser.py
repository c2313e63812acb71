"""report.html in a real browser: headless Chromium draws the page and every embedded image."""

import re
import subprocess

import numpy as np
import pytest
from pipeline import dev_pipeline


@pytest.fixture(scope="module")
def run(tmp_path_factory, dev_data):
    return dev_pipeline(tmp_path_factory, dev_data)


def _screenshot(chromium: str, page, shot, height: int = 5000) -> np.ndarray:
    from PIL import Image

    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size=1200,{height}", f"--screenshot={shot}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(shot).convert("RGB"), np.int16)


def test_chromium_draws_the_page_and_its_embedded_images(run, chromium, tmp_path):
    page = run["run_dir"] / "report.html"
    drawn = _screenshot(chromium, page, tmp_path / "page.png")
    # The same page with every image's data removed: what the browser draws without the embedded PNGs.
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', page.read_text()))
    without = _screenshot(chromium, bare, tmp_path / "bare.png")
    assert drawn.shape == without.shape
    ink = (np.abs(drawn - 255).sum(-1) > 60).mean()  # share of pixels that are not (nearly) white
    assert ink > 0.05, ink
    # The plots and the gallery's heatmaps (saturated colours of the jet colour map) are there only with images.
    changed = (np.abs(drawn - without).sum(-1) > 60).mean()
    assert changed > 0.03, changed
    def colourful(rgb):  # share of pixels far from grey: the text, tables and X-rays are grey, the plots are not
        return ((rgb.max(-1) - rgb.min(-1)) > 60).mean()

    assert colourful(drawn) > 0.02 and colourful(without) < 0.002, (colourful(drawn), colourful(without))
