"""A three-class run of the CLI on synthetic images, classes A and B marked by blobs in their own quadrant (tiny
backbone at 64 px, random weights):
``train-head --calibrate temperature`` through evaluate, export and predict; the multi-class report.html;
Grad-CAM of a chosen class in ``explain``."""

import json
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from pipeline import FAST, run_cli

NAMES = ["A", "B", "C"]
# Each class's signal and the quadrant (row, column) that carries it: a global-average-pooled head tells classes
# apart by what the maps hold, not where, so A and B differ in kind (bright and dark blobs); C has none.
SIGNALS = {"A": (130.0, (0, 0)), "B": (-110.0, (0, 1)), "C": (0.0, None)}


def quadrant_tree(target, train: int = 30, test: int = 8, size: int = 128, seed: int = 0):
    """Class folders A, B, C of synthetic noise images: two bright blobs in the top-left quadrant (A), two dark
    blobs in the top-right one (B), none (C). At --image-size 64 the tiny backbone's maps are 2 x 2, a cell per
    quadrant. Each image is its own patient."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    half = size // 2
    for split, count in (("train", train), ("test", test)):
        for i in range(3 * count):
            name = NAMES[i % 3]
            image = rng.normal(110, 12, size=(size, size))
            amplitude, where = SIGNALS[name]
            for _ in range(2 if where else 0):
                cy = where[0] * half + rng.integers(half // 4, 3 * half // 4)
                cx = where[1] * half + rng.integers(half // 4, 3 * half // 4)
                image += amplitude * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 16) ** 2))
            (target / split / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
                target / split / name / f"person{split}{i}_{name}_{i}.jpeg", quality=95)
    return target


@pytest.fixture(scope="module")
def run(tmp_path_factory, dev_data):
    """extract -> train-head -> evaluate (the uncalibrated report kept) -> train-head --calibrate temperature
    -> evaluate -> export."""
    root = tmp_path_factory.mktemp("three-class")
    data, cache_dir, model = quadrant_tree(root / "xrays"), root / "cache", root / "model"
    outputs = {}
    for name, args in (("extract", ["extract", "--data", data, "--cache-dir", cache_dir, *FAST]),
                       ("train-head", ["train-head", "--cache-dir", cache_dir, "--trials", "2", "--no-progress"]),
                       ("evaluate", ["evaluate", "--no-progress", "--cache-dir", cache_dir, "--bootstrap", "50"]),
                       ("calibrate", ["train-head", "--cache-dir", cache_dir, "--trials", "2", "--no-progress",
                                      "--calibrate", "temperature"]),
                       ("evaluate-calibrated", ["evaluate", "--no-progress", "--cache-dir", cache_dir, "--bootstrap",
                                                "50"]),
                       ("export", ["export", "--cache-dir", cache_dir, "--out", model])):
        result = run_cli(*args)
        assert result.exit_code == 0, f"{name}: {result.output} {result.exception!r}"
        outputs[name] = result.output
        if name == "evaluate":
            shutil.copyfile(next((cache_dir / "runs").glob("tiny-*")) / "report.json", root / "uncalibrated.json")
    run_dir = next((cache_dir / "runs").glob("tiny-*"))
    return {"data": data, "cache_dir": cache_dir, "run_dir": run_dir, "model": model, "outputs": outputs,
            "uncalibrated": json.loads((root / "uncalibrated.json").read_text())}


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_temperature_is_in_the_exported_multiclass_model_and_the_argmax_is_unchanged(run):
    before = run["uncalibrated"]
    record = json.loads((run["run_dir"] / "head.json").read_text())["calibration"]
    temperature = record["temperature"]
    assert record["method"] == "temperature" and record["classes"] == 3 and temperature > 0
    assert "temperature T =" in run["outputs"]["calibrate"]
    assert record["validation_after"]["log_loss"] <= record["validation_before"]["log_loss"] + 1e-9
    report = json.loads((run["run_dir"] / "report.json").read_text())
    assert report["head"]["trial_number"] == before["head"]["trial_number"]  # the same head, rescaled
    assert report["post_hoc_calibration"]["temperature"] == temperature
    # each test probability vector is softmax(log p / T) of the uncalibrated one (log p: the logits up to a constant)
    raw, scaled = np.array(before["predictions"]["probability"]), np.array(report["predictions"]["probability"])
    np.testing.assert_allclose(scaled, _softmax(np.log(np.clip(raw, 1e-30, 1)) / temperature), atol=1e-4)
    np.testing.assert_array_equal(scaled.argmax(1), raw.argmax(1))
    assert report["at_threshold"]["confusion"] == before["at_threshold"]["confusion"]
    calibration = report["calibration"]
    assert set(calibration["metrics"]) == {"brier", "ece", "nll"} and calibration["of"] == "top-class confidence"
    assert (run["run_dir"] / "calibration.png").stat().st_size > 0
    text = (run["run_dir"] / "report.md").read_text()
    assert "top-class confidence" in text and "Post-hoc calibration: temperature T =" in text
    # the card carries both; the exported model outputs the calibrated probabilities
    card = json.loads((run["model"] / "model.json").read_text())
    assert card["post_hoc_calibration"]["temperature"] == temperature
    assert set(card["calibration"]) == {"brier", "ece", "nll"}
    assert card["verification"]["max_abs_diff_saved_model"] <= card["verification"]["tolerance"]
    card_text = (run["model"] / "MODEL_CARD.md").read_text()
    assert "temperature T =" in card_text and "--calibrate temperature" in card_text
    assert "not calibrated" not in card_text
    assert run_cli("verify", run["model"]).exit_code == 0
    # predict on the raw files gives the evaluated (calibrated) probabilities
    paths = report["predictions"]["path"]
    result = run_cli("predict", "--no-progress", "--model", run["model"], "--json", *[run["data"] / p for p in paths])
    assert result.exit_code == 0, result.output
    predicted = json.loads(result.stdout)["predictions"]
    by_path = {p["path"]: p for p in predicted}
    for path, probs in zip(paths, scaled):
        p = by_path[str(run["data"] / path)]
        np.testing.assert_allclose([p["probabilities"][n] for n in NAMES], probs, atol=1e-5)
        assert p["label"] == NAMES[int(np.argmax(probs))]


def test_isotonic_is_refused_for_a_multiclass_head_in_one_line(run, tmp_path):
    shutil.copytree(run["cache_dir"], tmp_path / "cache")
    result = run_cli("train-head", "--cache-dir", tmp_path / "cache", "--trials", "2", "--no-progress",
                     "--calibrate", "isotonic")
    assert result.exit_code == 1 and "binary heads only" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


class _Tables(HTMLParser):
    """The tables of an HTML page as lists of rows of cell texts, and the alt texts of its embedded images."""

    def __init__(self, page: str):
        super().__init__()
        self.tables, self.images, self._cell = [], [], None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img" and attrs.get("src", "").startswith("data:image/png;base64,"):
            self.images.append(attrs.get("alt"))

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None


def _table_with(tables, header: str) -> list[list[str]]:
    return next(t for t in tables if t and t[0] and t[0][0] == header)


def test_multiclass_report_html_has_the_binary_pages_sections(run):
    from featcache.reports import format_ci

    report = json.loads((run["run_dir"] / "report.json").read_text())
    page = _Tables((run["run_dir"] / "report.html").read_text())
    scored, probe = report["at_threshold"], report["probe"]
    # macro metrics: the head, the multinomial probe and the majority class side by side, with intervals
    macro = _table_with(page.tables, "metric")
    assert macro[0] == ["metric", "head", "linear probe", f"majority ({NAMES[report['baseline']['class_index']]})"]
    assert macro[2][:3] == ["ROC-AUC (macro)", format_ci(scored["metrics"]["roc_auc"]),
                            format_ci(probe["test"]["metrics"]["roc_auc"])]
    per_class = _table_with(page.tables, "class")
    assert [row[0] for row in per_class[1:]] == NAMES
    for row, name in zip(per_class[1:], NAMES):
        assert row[1] == str(scored["per_class"][name]["images"])
        assert row[2] == format_ci(scored["per_class"][name]["roc_auc"])
        assert row[5] == format_ci(probe["test"]["per_class"][name]["roc_auc"])
    confusion = _table_with(page.tables, "true \\ called")
    assert [[int(v) for v in row[1:]] for row in confusion[1:]] == scored["confusion"]["matrix"]
    assert any(row[0] == "expected calibration error (top-class)" for t in page.tables for row in t)
    assert any("temperature T =" in cell for t in page.tables for row in t for cell in row)  # the post-hoc section
    for alt in ("one-vs-rest ROC curves, per class", "one-vs-rest precision-recall curves, per class",
                "confusion matrix at the argmax", "reliability of the top-class confidence"):
        assert alt in page.images, page.images
    for name in ("roc.png", "pr.png", "confusion.png", "calibration.png"):
        assert (run["run_dir"] / name).stat().st_size > 0


def test_chromium_draws_the_multiclass_page(run, chromium, tmp_path):
    from test_report_browser import _screenshot

    page = run["run_dir"] / "report.html"
    drawn = _screenshot(chromium, page, tmp_path / "page.png")
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', page.read_text()))
    without = _screenshot(chromium, bare, tmp_path / "bare.png")

    def colourful(rgb):  # the text and tables are grey; the curves and the colour maps are not
        return ((rgb.max(-1) - rgb.min(-1)) > 60).mean()

    assert colourful(drawn) > 0.01 and colourful(without) < 0.002, (colourful(drawn), colourful(without))


def _explain(run, out, *args):
    result = run_cli("explain", "--cache-dir", run["cache_dir"], "--out", out, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _peaks(images, label):
    return [np.unravel_index(int(np.argmax(i["heatmap"])), np.shape(i["heatmap"])) for i in images
            if i["label"] == label]


def test_explain_draws_the_predicted_class_or_the_class_asked_for(run, tmp_path):
    predicted = _explain(run, tmp_path / "predicted")
    assert predicted["agreement"]["max_abs_diff"] <= predicted["agreement"]["tolerance"]
    assert all(i["explained"] == i["predicted"] for i in predicted["images"])
    assert len(list((tmp_path / "predicted").glob("*.png"))) == len(predicted["images"]) == 24
    by_class = {name: _explain(run, tmp_path / name, "--class", name) for name in ("A", "B")}
    for name, result in by_class.items():
        assert result["agreement"]["max_abs_diff"] <= result["agreement"]["tolerance"]  # cached == end to end
        assert all(i["explained"] == name for i in result["images"])
        row, col = SIGNALS[name][1]
        peaks = _peaks(result["images"], name)  # class k's own images: the map of k peaks in k's quadrant
        assert np.mean([p == (row, col) for p in peaks]) >= 0.75, (name, peaks)
    a, b = (np.array([i["heatmap"] for i in by_class[n]["images"]]) for n in ("A", "B"))
    assert not np.allclose(a, b)  # the map changes with the class
    # the exported model draws the same heatmaps from the raw files (float16 maps in the cache)
    files = [run["data"] / i["path"] for i in by_class["B"]["images"][:6]]
    result = run_cli("explain", "--model", run["model"], "--class", "B", "--out", tmp_path / "files", "--json", *files)
    assert result.exit_code == 0, result.output
    from featcache.gradcam import normalize

    for cached, fresh in zip(by_class["B"]["images"][:6], json.loads(result.stdout)["images"]):
        assert fresh["explained"] == "B"
        np.testing.assert_allclose(normalize(np.array(fresh["heatmap"])), normalize(np.array(cached["heatmap"])),
                                   atol=1e-2)
    result = run_cli("explain", "--cache-dir", run["cache_dir"], "--class", "Z", "--out", tmp_path / "z")
    assert result.exit_code == 1 and "--class must be one of A, B, C" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_report_gallery_shows_the_most_confident_mistakes_with_their_heatmaps(run):
    from featcache.multiclass_html import most_confident_mistakes

    report = json.loads((run["run_dir"] / "report.json").read_text())
    mistakes = most_confident_mistakes(report)
    probs, labels = np.array(report["predictions"]["probability"]), np.array(report["predictions"]["label"])
    wrong = np.flatnonzero(probs.argmax(1) != labels)
    assert sorted(mistakes) == sorted(wrong[np.argsort(-probs[wrong].max(1))][:4].tolist())
    assert len(mistakes) >= 1  # this run calls some test images wrong (report.md's confusion matrix)
    page = _Tables((run["run_dir"] / "report.html").read_text())
    shown = [alt for alt in page.images if " called " in alt]
    assert len(shown) == len(mistakes) == len(list((run["run_dir"] / "gallery").glob("mistake-*.png")))
    for alt, i in zip(shown, mistakes):
        assert alt.startswith(report["predictions"]["path"][i]) and f"true {NAMES[labels[i]]}" in alt
