"""The reassembled model: standard layers only, the cache's exact weights, and parity with the cached path."""

import json

import numpy as np
import pytest
from pipeline import copy_run, dev_pipeline

from featcache.assemble import (
    PARITY_TOLERANCE,
    assemble_model,
    check_parity,
    load_head,
    predict_features,
    predict_images,
)
from featcache.cache import open_cache, read_rows
from featcache.data import hash_file
from featcache.decode import load_image
from featcache.errors import CacheMismatchError, FeatcacheError, WeightsError
from featcache.runs import check_head_matches_cache, load_head_record


@pytest.fixture(scope="module")
def run(tmp_path_factory, dev_data):
    return dev_pipeline(tmp_path_factory, dev_data)


def _assemble(cache):
    record = load_head_record(cache)
    return assemble_model(cache, record, check_head_matches_cache(record, cache))


def _test_rows(cache):
    with open_cache(cache) as handle:
        rows = np.flatnonzero((handle["split"][...] == 2) & (handle["copy_index"][...] == 0))
        paths = handle["files/path"].asstr()[...][read_rows(handle["source_index"], rows)].tolist()
        return paths, read_rows(handle["features"], rows)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def test_model_is_standard_layers_with_the_cache_weights(run):
    assembled = _assemble(run["cache"])
    model, manifest = assembled.model, assembled.manifest
    assert model.input.dtype == "uint8" and tuple(model.input.shape) == (None, 64, 64, 3)
    assert tuple(model.output.shape) == (None, 1)
    kinds = {type(layer).__name__ for layer in _all_layers(model)}
    assert "Lambda" not in kinds and kinds <= {"InputLayer", "Rescaling", "Dense", "Conv2D", "Functional",
                                               "GlobalAveragePooling2D", "Dropout"}, kinds
    assert all(type(layer).__module__.startswith("keras.") for layer in _all_layers(model))
    assert assembled.weights_sha256 == manifest["weights"]["sha256"]
    assert not any(layer.trainable for layer in model.layers[:-1] if layer.weights)  # preprocessing, backbone frozen


def test_parity_float16_cache(run):
    assembled = _assemble(run["cache"])
    paths, features = _test_rows(run["cache"])
    images = np.stack([load_image(run["data"] / p, 64) for p in paths])
    probs = predict_images(assembled.model, images, batch_size=16)
    parity = check_parity(probs, predict_features(assembled.head, features), "float16", paths)
    assert parity["images"] == 150 and 0 < parity["max_abs_diff"] <= 1e-3


def test_parity_float32_cache_is_tight(small_xrays, extract_config):
    from featcache.config import TrainHeadConfig
    from featcache.extract import extract_features
    from featcache.tune import train_heads

    config = extract_config(small_xrays, dtype="float32", augment_copies=1)
    cache = extract_features(config)[0].cache_path
    train_heads(TrainHeadConfig(cache_dir=config.cache_dir, trials=1, max_epochs=2, progress=False))
    assembled = _assemble(cache)
    paths, features = _test_rows(cache)
    assert features.dtype == np.float32
    probs = predict_images(assembled.model, np.stack([load_image(small_xrays / p, 64) for p in paths]))
    parity = check_parity(probs, predict_features(assembled.head, features), "float32", paths)
    assert parity["max_abs_diff"] <= PARITY_TOLERANCE["float32"] == 1e-5


def test_parity_failure_names_the_worst_image():
    check_parity(np.array([0.5, 0.2]), np.array([0.5004, 0.2]), "float16", ["a", "b"])
    with pytest.raises(FeatcacheError, match=r"probability of b differs .* by 0.002 .*Received: max_abs_diff"):
        check_parity(np.array([0.5, 0.2]), np.array([0.5, 0.202]), "float16", ["a", "b"])
    with pytest.raises(FeatcacheError, match="tolerance 1e-05 for a float32 cache.*re-run 'featcache extract'"):
        check_parity(np.array([0.5]), np.array([0.50002]), "float32", ["a"])
    with pytest.raises(FeatcacheError, match="--precision float32"):
        check_parity(np.array([0.5]), np.array([0.51]), "float16", ["a"], precision="mixed")


def test_changed_backbone_weights_are_refused(run, tmp_path):
    import keras

    from featcache.backbones import get_backbone_spec

    copy = copy_run(run, tmp_path)
    keras.utils.set_random_seed(123)
    get_backbone_spec("tiny").build(64, None).save_weights(str(copy["cache"].with_name(f"{copy['cache'].stem}.weights.h5")))
    with pytest.raises(WeightsError, match="re-run 'featcache extract'"):
        _assemble(copy["cache"])


def test_head_of_another_feature_shape_is_refused(run, tmp_path):
    from featcache.head import HeadParams, build_head

    build_head((1, 1, 16), HeadParams(units=4)).maps.save(tmp_path / "head.keras")
    manifest = json.loads((run["run_dir"] / "head.json").read_text())
    with pytest.raises(CacheMismatchError, match=r"shape \(1, 1, 16\).*\(2, 2, 16\)"):
        load_head({**manifest, "head_path": str(tmp_path / "head.keras"), "run_dir": str(tmp_path),
                   "head_sha256": hash_file(tmp_path / "head.keras")}, {"feature_shape": [2, 2, 16]})


def test_head_swapped_after_its_record_was_read_is_refused(run, tmp_path):
    """load_head checks head.keras against head.json's SHA-256 again right before loading it."""
    from featcache.head import HeadParams, build_head

    record = load_head_record(run["cache"])
    build_head((2, 2, 16), HeadParams(units=4)).maps.save(tmp_path / "head.keras")
    with pytest.raises(CacheMismatchError, match="was replaced or damaged"):
        load_head({**record, "head_path": str(tmp_path / "head.keras")}, {"feature_shape": [2, 2, 16]})
