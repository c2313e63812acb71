"""Regression pins: VGG16, ResNet152 and the tiny backbone keep their exact fingerprints, random weights and
extractor layers. The values were computed on main (161be70) before the registry accepted any Keras
architecture, with cache format 2; a change here invalidates every existing cache of these backbones. The
fingerprints are recomputed here with that format number, so the pins hold the feature settings fixed across
deliberate format bumps (format 3, the sharded cache, renames every cache once, on purpose)."""

import hashlib
import json
from pathlib import Path

import pytest

from featcache.backbones import build_extractor, get_backbone_spec, hash_weights, load_backbone
from featcache.cache import FORMAT_VERSION, compute_fingerprint
from featcache.config import ExtractConfig
from featcache.extract import _feature_settings

FINGERPRINTS = {
    ("vgg16", 224): "19aa16103ef3ef3c7a40f47575844302ec05f88a08a72dd655a6ef5c7f14ea8c",
    ("resnet152", 224): "3bbe1b98860b647a879121fed7284a90504dffb922943868865febb49d0f7f6f",
    ("tiny", 64): "cbaa72309735fbb90a11c1c1b6194779afeebc73178ddb621ab5ae9c3f3b1d93",
}
RANDOM_WEIGHTS = {  # hash_weights of load_backbone(spec, size, "random", seed=0), Keras 3 initialisers
    ("tiny", 64): "267c67da49edbc0073eb282dbdabe0d28e9e75957f48886748e3feea45aa9731",
    ("vgg16", 32): "c7ce9347285f12ce33bcffdef011b7aac71574349afa26212934c2217b3b4807",
    ("resnet152", 32): "ad384e38fded165a700d10f9f038dc471be536800ce8d67c77106f1b69961366",
}


@pytest.mark.parametrize("name, size", sorted(FINGERPRINTS))
def test_fingerprints_of_the_original_backbones_are_unchanged(name, size):
    spec = get_backbone_spec(name)
    config = ExtractConfig(data_dir=Path("xrays"), backbones=(name,), weights="random", image_size=size, seed=0)
    settings = _feature_settings(config, spec, "ab" * 32, "float32")
    assert settings["preprocessing"] == {"mode": "caffe", "mean_bgr": [103.939, 116.779, 123.68]}
    format2 = json.dumps({"format_version": 2, **settings}, sort_keys=True, default=str)
    assert hashlib.sha256(format2.encode()).hexdigest() == FINGERPRINTS[(name, size)]
    assert FORMAT_VERSION == 3 and compute_fingerprint(settings) != FINGERPRINTS[(name, size)]


@pytest.mark.parametrize("name, size", sorted(RANDOM_WEIGHTS))
def test_random_weights_and_extractor_layers_of_the_original_backbones_are_unchanged(name, size):
    spec = get_backbone_spec(name)
    backbone = load_backbone(spec, size, "random", seed=0)
    assert hash_weights(backbone) == RANDOM_WEIGHTS[(name, size)]
    extractor = build_extractor(spec, backbone, size)
    assert [layer.name for layer in extractor.layers] == ["image", "preprocess_to_float", "preprocess_caffe", name]
