"""The real architectures at 224 px through the whole CLI (random weights: no download). Slow: ``-m slow``."""

import json

import keras
import numpy as np
import pytest

from conftest import copy_subset
from featcache.cache import list_caches, open_cache
from pipeline import run_cli


@pytest.mark.slow
@pytest.mark.parametrize("backbone, channels", [("vgg16", 512), ("resnet152", 2048)])
def test_real_backbone_extract_train_evaluate_export_at_224(backbone, channels, dev_data, tmp_path):
    data = copy_subset(dev_data, tmp_path / "xrays", {
        "train/NORMAL": 6, "train/PNEUMONIA": 6, "test/NORMAL": 3, "test/PNEUMONIA": 3})
    cache_dir = tmp_path / "cache"
    steps = (
        ["extract", "--data", data, "--cache-dir", cache_dir, "--backbone", backbone, "--weights", "random",
         "--augment-copies", "1", "--batch-size", "8", "--no-progress"],
        ["train-head", "--cache-dir", cache_dir, "--trials", "2", "--no-progress"],
        ["evaluate", "--no-progress", "--cache-dir", cache_dir, "--bootstrap", "100"],
        ["export", "--cache-dir", cache_dir, "--out", tmp_path / "model"],
    )
    for args in steps:
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
    (cache,) = list_caches(cache_dir, backbone)
    with open_cache(cache) as handle:
        assert handle["features"].shape[1:] == (7, 7, channels)
    report = json.loads((cache_dir / "runs" / cache.stem / "report.json").read_text())
    assert report["parity"]["images"] == 6 and report["parity"]["max_abs_diff"] <= 1e-3
    model = keras.saving.load_model(tmp_path / "model" / "model.keras")
    image = np.zeros((1, 224, 224, 3), np.uint8)
    assert 0.0 <= float(model.predict(image, verbose=0)[0, 0]) <= 1.0
