"""Any keras.applications architecture as a backbone: names, preprocessing modes against Keras's own
``preprocess_input``, parameter counts, extraction through the CLI, safe-mode export, ``--feature-layer``."""

import json

import keras
import numpy as np
import pytest

from conftest import copy_subset
from featcache.applications import APPLICATIONS, registry_key
from featcache.backbones import (
    BACKBONES, build_extractor, build_preprocessing, check_image_size, get_backbone_spec, load_backbone,
    load_cached_backbone, resolve_image_size,
)
from featcache.cache import compute_fingerprint, list_caches, open_cache, read_manifest
from featcache.config import ExtractConfig
from featcache.decode import load_image
from featcache.errors import FeatcacheError
from featcache.extract import _feature_settings
from featcache.feature_layers import feature_layer_choices, select_feature_layer
from pipeline import run_cli

KERAS_CONSTRUCTORS = sorted(name for name in dir(keras.applications) if name[0].isupper())


def test_every_keras_application_is_registered_under_any_spelling():
    assert KERAS_CONSTRUCTORS and set(KERAS_CONSTRUCTORS) == set(APPLICATIONS)
    for constructor in KERAS_CONSTRUCTORS:
        assert get_backbone_spec(constructor).name == registry_key(constructor) in BACKBONES
    assert get_backbone_spec("convnext_tiny") is get_backbone_spec("ConvNeXt-Tiny") is BACKBONES["convnexttiny"]
    assert get_backbone_spec("EfficientNetV2B0").preprocessing == "none"
    assert get_backbone_spec("DenseNet121").preprocessing == "torch"
    assert get_backbone_spec("InceptionV3").default_size == 299


def test_unknown_backbone_names_the_closest_and_every_known_name():
    with pytest.raises(FeatcacheError, match=r"Unknown backbone 'densenet12'; did you mean densenet121") as error:
        get_backbone_spec("densenet12")
    message = str(error.value)
    assert "\n" not in message and "efficientnetv2b0" in message and message.endswith("Received: backbone='densenet12'")


def test_unknown_backbone_on_the_command_line_is_one_line_and_exit_1(tmp_path, dev_data):
    result = run_cli("extract", "--data", dev_data, "--cache-dir", tmp_path / "c", "--backbone", "resnet51",
                     "--weights", "random", "--no-progress")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "Unknown backbone 'resnet51'; did you mean resnet50" in result.output
    assert not (tmp_path / "c").exists() or not list_caches(tmp_path / "c")


@pytest.mark.parametrize("constructor", KERAS_CONSTRUCTORS)
def test_preprocessing_layers_equal_the_architectures_own_preprocess_input(constructor):
    spec = get_backbone_spec(constructor)
    module = keras.applications.__dict__[constructor].__module__.rsplit(".", 1)[-1]  # e.g. densenet
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    x = images
    for layer in build_preprocessing(spec, 32):
        x = layer(x)
    expected = getattr(keras.applications, module).preprocess_input(images.astype("float32"))
    np.testing.assert_allclose(np.asarray(x), expected, rtol=1e-6, atol=2e-6)
    if spec.preprocessing != "caffe":  # caffe is checked bit for bit in test_backbones.py
        assert not np.array_equal(np.asarray(x), images) or spec.preprocessing == "none"


def test_image_size_defaults_and_minimums():
    inception = get_backbone_spec("inceptionv3")
    assert resolve_image_size(inception, None) == 299 and resolve_image_size(inception, 128) == 128
    check_image_size(inception, 100)  # any side from the minimum: no multiple of 32 needed
    with pytest.raises(FeatcacheError, match="at least 75 for inceptionv3"):
        check_image_size(inception, 64)
    with pytest.raises(FeatcacheError, match="multiple of 32 for vgg16"):
        check_image_size(get_backbone_spec("vgg16"), 100)


@pytest.mark.parametrize("constructor, size, shape", [
    ("DenseNet121", 32, (1, 1, 1024)),
    ("EfficientNetV2B0", 64, (2, 2, 1280)),
])
def test_parameter_counts_and_shapes_equal_keras(constructor, size, shape):
    spec = get_backbone_spec(constructor)
    ours = load_backbone(spec, size, "random", seed=0)
    reference = getattr(keras.applications, constructor)(include_top=False, weights=None,
                                                         input_shape=(size, size, 3))
    assert ours.count_params() == reference.count_params() > 1_000_000
    assert tuple(ours.output_shape[1:]) == tuple(reference.output_shape[1:]) == shape
    assert not ours.trainable


@pytest.mark.parametrize("spelling, name, mode, channels", [
    ("DenseNet121", "densenet121", "torch", 1024),
    pytest.param("efficientnet_v2_b0", "efficientnetv2b0", "none", 1280, marks=pytest.mark.slow),
])
def test_new_backbone_extracts_through_the_cli_and_reloads_for_parity(spelling, name, mode, channels, dev_data,
                                                                       tmp_path):
    data = copy_subset(dev_data, tmp_path / "xrays", {
        "train/NORMAL": 2, "train/PNEUMONIA": 2, "test/NORMAL": 1, "test/PNEUMONIA": 1})
    cache_dir = tmp_path / "cache"
    result = run_cli("extract", "--data", data, "--cache-dir", cache_dir, "--backbone", spelling, "--weights",
                     "random", "--image-size", "32", "--augment-copies", "0", "--batch-size", "4", "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"maps (1, 1, {channels}) at 32 px" in result.output
    (cache,) = list_caches(cache_dir, name)
    manifest = read_manifest(cache)
    assert manifest["backbone"] == name and manifest["preprocessing"]["mode"] == mode
    assert manifest["feature_shape"] == [1, 1, channels]
    spec = get_backbone_spec(name)
    backbone = load_cached_backbone(cache, manifest)  # the saved random weights, checked against the manifest
    extractor = build_extractor(spec, backbone, 32)
    with open_cache(cache) as handle:
        paths = [p.decode() if isinstance(p, bytes) else p for p in handle["files/path"][...]]
        rows = handle["source_index"][...]
        features = handle["features"][...].astype(np.float32)
    images = np.stack([load_image(data / paths[i], 32) for i in rows])
    recomputed = np.asarray(extractor(images, training=False))
    np.testing.assert_allclose(recomputed, features, rtol=2e-3, atol=2e-3)  # float16 cache
    info = run_cli("info", cache_dir)
    assert info.exit_code == 0 and f"preprocessing {mode}" in info.output and f"backbone {name}" in info.output


@pytest.mark.parametrize("constructor, size", [
    ("EfficientNetV2B0", 32),
    pytest.param("ConvNeXtTiny", 32, marks=pytest.mark.slow),  # its LayerScale and StochasticDepth layers
])
def test_end_to_end_model_of_a_new_backbone_loads_in_safe_mode(constructor, size, tmp_path):
    from featcache.head import HeadParams, build_head

    spec = get_backbone_spec(constructor)
    extractor = build_extractor(spec, load_backbone(spec, size, "random", seed=0), size)
    head = build_head(tuple(extractor.output_shape[1:]), HeadParams()).maps
    model = keras.Model(extractor.input, head(extractor.output))
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    expected = np.asarray(model(images, training=False))
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    np.testing.assert_allclose(np.asarray(reloaded(images, training=False)), expected, atol=1e-6)


# --- --feature-layer -----------------------------------------------------------------------------


def test_feature_layer_choices_and_bad_layers():
    spec = get_backbone_spec("efficientnetv2b0")
    backbone = load_backbone(spec, 64, "random", seed=0)
    choices = dict(feature_layer_choices(backbone))
    assert list(choices.values()) == [(32, 32, 16), (16, 16, 32), (8, 8, 192), (4, 4, 672), (2, 2, 1280)]
    assert choices["top_activation"] == (2, 2, 1280)
    assert select_feature_layer(spec, backbone, "block4a_expand_activation").output_shape[1:] == (8, 8, 192)
    with pytest.raises(FeatcacheError, match=r"no layer 'block9'; the last layer at each resolution is: .*top_activation"):
        select_feature_layer(spec, backbone, "block9")
    with pytest.raises(FeatcacheError, match=r"'block4a_se_squeeze' .* does not give one \(batch, h, w, c\) feature map"):
        select_feature_layer(spec, backbone, "block4a_se_squeeze")
    # Keras names the model's own Rescaling layer rescaling, rescaling_1, ... by how many it built before.
    auto = next(layer.name for layer in backbone.layers if layer.name.startswith("rescaling"))
    with pytest.raises(FeatcacheError, match=rf"'{auto}' .* numbers anew in each build"):
        select_feature_layer(spec, backbone, auto)


def test_feature_layer_enters_the_fingerprint_and_keeps_the_weights(small_xrays, extract_config):
    spec = get_backbone_spec("tiny")
    plain = _feature_settings(extract_config(small_xrays), spec, "ab" * 32, "float32")
    cut = _feature_settings(extract_config(small_xrays, feature_layer="tiny_conv3"), spec, "ab" * 32, "float32")
    assert cut == {**plain, "feature_layer": "tiny_conv3"} and compute_fingerprint(cut) != compute_fingerprint(plain)
    generic = _feature_settings(ExtractConfig(data_dir=small_xrays, backbones=("resnet50",), image_size=64),
                                get_backbone_spec("resnet50"), "ab" * 32, "float32")
    assert generic["architecture"] == "keras.applications.ResNet50"
    with pytest.raises(FeatcacheError, match="exactly one --backbone"):
        extract_config(small_xrays, backbones=("tiny", "vgg16"), feature_layer="tiny_conv3")


def test_unknown_feature_layer_on_the_command_line(small_xrays, tmp_path):
    result = run_cli("extract", "--data", small_xrays, "--cache-dir", tmp_path / "c", "--backbone", "tiny",
                     "--weights", "random", "--image-size", "64", "--feature-layer", "conv9", "--no-progress")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "tiny has no layer 'conv9'; the last layer at each resolution is: tiny_conv0" in result.output
    assert not list((tmp_path / "c").glob("tiny-*"))  # refused before any cache work (no .partial, no weights)


def test_feature_layer_cache_trains_evaluates_and_exports_with_parity(small_xrays, tmp_path):
    cache_dir, out = tmp_path / "cache", tmp_path / "model"
    for args in (
        ["extract", "--data", small_xrays, "--cache-dir", cache_dir, "--backbone", "tiny", "--weights", "random",
         "--image-size", "64", "--augment-copies", "0", "--feature-layer", "tiny_conv3", "--no-progress"],
        ["train-head", "--cache-dir", cache_dir, "--trials", "1", "--no-progress"],
        ["evaluate", "--no-progress", "--cache-dir", cache_dir, "--bootstrap", "50"],
        ["export", "--cache-dir", cache_dir, "--out", out],
    ):
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
    (cache,) = list_caches(cache_dir, "tiny")
    manifest = read_manifest(cache)
    assert manifest["feature_layer"] == "tiny_conv3" and manifest["feature_shape"] == [4, 4, 16]
    report = json.loads((cache_dir / "runs" / cache.stem / "report.json").read_text())
    assert report["parity"]["images"] == 8 and report["parity"]["max_abs_diff"] <= report["parity"]["tolerance"]
    card = json.loads((out / "model.json").read_text())
    assert card["feature_layer"] == "tiny_conv3"
    model = keras.saving.load_model(out / "model.keras", safe_mode=True)
    assert model.predict(np.zeros((1, 64, 64, 3), np.uint8), verbose=0).shape == (1, 1)


def test_backbones_command_lists_names_and_layers():
    listing = run_cli("backbones")
    assert listing.exit_code == 0 and "densenet121" in listing.output and "torch" in listing.output
    assert "inceptionv3" in listing.output and "299" in listing.output
    layers = run_cli("backbones", "tiny", "--image-size", "64")
    assert layers.exit_code == 0, layers.output
    assert "feature maps (2, 2, 16)" in layers.output and "tiny_conv3" in layers.output and "(4, 4, 16)" in layers.output
    bad = run_cli("backbones", "resnet51")
    assert bad.exit_code == 1 and "did you mean resnet50" in bad.output


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined or non-square")  # Keras: weights are for 224 px
def test_imagenet_weights_of_a_new_backbone_offline_name_the_alternatives(monkeypatch):
    from featcache.errors import WeightsError

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr("keras.src.utils.file_utils.get_file", offline)
    with pytest.raises(WeightsError, match=r"ImageNet weights for mobilenetv3small .*--weights PATH.*--weights random"):
        load_backbone(get_backbone_spec("MobileNetV3Small"), 32, "imagenet", seed=0)


@pytest.mark.slow
def test_a_new_backbone_goes_through_train_head_evaluate_and_export(small_xrays, tmp_path):
    cache_dir, out = tmp_path / "cache", tmp_path / "model"
    for args in (
        ["extract", "--data", small_xrays, "--cache-dir", cache_dir, "--backbone", "EfficientNetV2B0", "--weights",
         "random", "--image-size", "32", "--augment-copies", "0", "--no-progress"],
        ["train-head", "--cache-dir", cache_dir, "--backbone", "efficientnet_v2_b0", "--trials", "1", "--no-progress"],
        ["evaluate", "--no-progress", "--cache-dir", cache_dir, "--bootstrap", "50"],
        ["export", "--cache-dir", cache_dir, "--out", out],
    ):
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
    card = json.loads((out / "model.json").read_text())
    assert card["backbone"] == "efficientnetv2b0" and card["preprocessing"]["backbone"]["mode"] == "none"
    assert card["parity"]["max_abs_diff"] <= card["parity"]["tolerance"]
    assert card["verification"]["max_abs_diff_model_keras"] <= card["verification"]["tolerance"]
    model = keras.saving.load_model(out / "model.keras", safe_mode=True)
    assert model.predict(np.zeros((1, 32, 32, 3), np.uint8), verbose=0).shape == (1, 1)
