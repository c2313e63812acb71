import numpy as np
import pytest

from featcache.backbones import (
    build_extractor, build_preprocessing, check_image_size, get_backbone_spec, hash_weights, load_backbone,
)
from featcache.errors import FeatcacheError, WeightsError


@pytest.mark.parametrize("name, params, shape", [
    ("vgg16", 14_714_688, (7, 7, 512)),
    ("resnet152", 58_370_944, (7, 7, 2048)),
])
def test_real_architectures_at_224(name, params, shape):
    spec = get_backbone_spec(name)
    model = load_backbone(spec, 224, "random", seed=0)
    assert model.count_params() == params
    assert tuple(model.output_shape[1:]) == shape == spec.feature_shape(224)
    assert not model.trainable


@pytest.mark.parametrize("module", ["vgg16", "resnet"])
def test_preprocessing_layers_equal_keras_preprocess_input(module):
    import keras

    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    x = images
    for layer in build_preprocessing(get_backbone_spec("vgg16"), 32):
        x = layer(x)
    expected = getattr(keras.applications, module).preprocess_input(images.astype("float32"))
    assert np.array_equal(np.asarray(x), expected)


def test_random_weights_are_seeded():
    spec = get_backbone_spec("tiny")
    a = hash_weights(load_backbone(spec, 64, "random", seed=1))
    assert a == hash_weights(load_backbone(spec, 64, "random", seed=1))
    assert a != hash_weights(load_backbone(spec, 64, "random", seed=2))


def test_weights_file_round_trip_and_wrong_architecture(tmp_path):
    tiny = get_backbone_spec("tiny")
    model = load_backbone(tiny, 64, "random", seed=5)
    path = tmp_path / "tiny.weights.h5"
    model.save_weights(str(path))
    assert hash_weights(load_backbone(tiny, 64, str(path), seed=0)) == hash_weights(model)
    with pytest.raises(WeightsError, match="does not fit vgg16"):
        load_backbone(get_backbone_spec("vgg16"), 64, str(path), seed=0)
    with pytest.raises(WeightsError, match="does not exist"):
        load_backbone(tiny, 64, str(tmp_path / "missing.h5"), seed=0)


def test_imagenet_download_failure_names_the_offline_options(monkeypatch):
    import keras

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setattr("keras.src.applications.vgg16.file_utils.get_file", offline, raising=False)
    with pytest.raises(WeightsError, match="--weights PATH.*--weights random"):
        load_backbone(get_backbone_spec("vgg16"), 32, "imagenet", seed=0)
    with pytest.raises(WeightsError, match="no ImageNet weights"):
        load_backbone(get_backbone_spec("tiny"), 32, "imagenet", seed=0)


def test_extractor_takes_uint8_and_matches_manual_pipeline():
    spec = get_backbone_spec("tiny")
    backbone = load_backbone(spec, 64, "random", seed=0)
    extractor = build_extractor(spec, backbone, 64)
    images = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    import keras

    manual = backbone(keras.applications.vgg16.preprocess_input(images.astype("float32")), training=False)
    assert np.allclose(extractor(images, training=False), manual, atol=1e-5)
    assert extractor.output_shape[1:] == spec.feature_shape(64)


def test_unknown_backbone_and_bad_image_size():
    with pytest.raises(FeatcacheError, match="Unknown backbone 'vgg17'"):
        get_backbone_spec("vgg17")
    with pytest.raises(FeatcacheError, match="multiple of 32"):
        check_image_size(get_backbone_spec("vgg16"), 100)


def test_cached_backbone_is_rebuilt_and_checked(small_xrays, extract_config):
    from featcache.cache import read_manifest
    from featcache.backbones import load_cached_backbone
    from featcache.extract import extract_features

    (summary,) = extract_features(extract_config(small_xrays, augment_copies=0))
    manifest = read_manifest(summary.cache_path)
    model = load_cached_backbone(summary.cache_path, manifest)
    assert hash_weights(model) == manifest["weights"]["sha256"]
    tampered = {**manifest, "weights": {**manifest["weights"], "sha256": "0" * 64}}
    with pytest.raises(WeightsError, match="re-run 'featcache extract'"):
        load_cached_backbone(summary.cache_path, tampered)
