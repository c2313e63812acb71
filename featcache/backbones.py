"""Backbone registry: name -> spec (architecture, preprocessing, feature shape), and weight loading.

Preprocessing is bound to each entry and built from standard Keras layers, so the model that
extraction runs and the model that export saves are one definition.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from featcache.errors import FeatcacheError, WeightsError

log = logging.getLogger(__name__)

# ImageNet channel means in BGR order, as in keras.applications.imagenet_utils (mode="caffe").
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone.

    Attributes:
        name: registry key, also the CLI value of ``--backbone``.
        build: ``build(image_size, weights) -> keras.Model`` without top; ``weights`` is
            ``None``, ``"imagenet"`` or a file path, as keras.applications takes it.
        channels: channels of the last feature map.
        preprocessing: preprocessing mode of ``keras.applications.imagenet_utils``.
        reduction: spatial stride of the backbone (224 px -> 7x7 at 32).
        has_imagenet: whether ``weights="imagenet"`` exists for this entry.
    """

    name: str
    build: Callable[[int, str | None], "keras.Model"]  # noqa: F821
    channels: int
    preprocessing: str = "caffe"
    reduction: int = 32
    has_imagenet: bool = True

    def feature_shape(self, image_size: int) -> tuple[int, int, int]:
        side = image_size // self.reduction
        return (side, side, self.channels)


def _build_vgg16(image_size: int, weights: str | None):
    import keras

    return keras.applications.VGG16(
        include_top=False, weights=weights, input_shape=(image_size, image_size, 3)
    )


def _build_resnet152(image_size: int, weights: str | None):
    import keras

    return keras.applications.ResNet152(
        include_top=False, weights=weights, input_shape=(image_size, image_size, 3)
    )


def _build_tiny(image_size: int, weights: str | None):
    """Five strided convolutions (stride 32 overall): the real code paths at test speed."""
    import keras

    inputs = keras.Input((image_size, image_size, 3))
    x = inputs
    for i, filters in enumerate((8, 8, 16, 16, 16)):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu", name=f"tiny_conv{i}")(x)
    model = keras.Model(inputs, x, name="tiny")
    if weights not in (None, "imagenet"):
        model.load_weights(weights)
    return model


BACKBONES: dict[str, BackboneSpec] = {
    "vgg16": BackboneSpec("vgg16", _build_vgg16, channels=512),
    "resnet152": BackboneSpec("resnet152", _build_resnet152, channels=2048),
    "tiny": BackboneSpec("tiny", _build_tiny, channels=16, has_imagenet=False),
}


def get_backbone_spec(name: str) -> BackboneSpec:
    """Look a backbone up in the registry.

    Raises:
        FeatcacheError: the name is not registered.
    """
    try:
        return BACKBONES[name]
    except KeyError:
        raise FeatcacheError(
            f"Unknown backbone {name!r}; expected one of {', '.join(sorted(BACKBONES))}. Received: backbone={name!r}"
        ) from None


def build_preprocessing(spec: BackboneSpec, image_size: int):
    """uint8 RGB images (n, s, s, 3) -> the backbone's input, as standard layers only.

    Caffe mode is ``x[..., ::-1] - mean_bgr``. A frozen Dense(3) whose kernel is the channel
    permutation and whose bias is ``-mean_bgr`` computes exactly that (each output is one input
    times 1.0 plus the bias), and needs no Lambda layer, so the exported model loads in safe mode.
    """
    import keras

    if spec.preprocessing != "caffe":
        raise FeatcacheError(f"Unsupported preprocessing {spec.preprocessing!r}. Received: backbone={spec.name!r}")
    to_float = keras.layers.Rescaling(1.0, name="preprocess_to_float")
    caffe = keras.layers.Dense(3, name="preprocess_caffe", trainable=False)
    caffe.build((None, image_size, image_size, 3))
    permutation = np.eye(3, dtype="float32")[::-1]  # output j takes input channel 2 - j
    caffe.set_weights([permutation, -np.asarray(CAFFE_MEAN_BGR, dtype="float32")])
    return [to_float, caffe]


def load_backbone(spec: BackboneSpec, image_size: int, weights: str, seed: int, mixed: bool = False):
    """Build the frozen backbone with the requested weights.

    Args:
        spec: registry entry.
        image_size: square input side in pixels (a multiple of ``spec.reduction``).
        weights: ``"imagenet"``, ``"random"`` (seeded) or a path to a Keras weights file.
        seed: seed of the random initialisation.
        mixed: build with the mixed_float16 policy (GPU); variables stay float32.

    Returns:
        A ``keras.Model`` with ``trainable = False``.

    Raises:
        WeightsError: the weights cannot be fetched or do not fit the architecture.
    """
    import keras

    previous = keras.config.dtype_policy()
    if mixed:
        keras.config.set_dtype_policy("mixed_float16")
    try:
        model = _build_with_weights(spec, image_size, weights, seed)
    finally:
        keras.config.set_dtype_policy(previous)
    model.trainable = False
    return model


def _build_with_weights(spec: BackboneSpec, image_size: int, weights: str, seed: int):
    import keras

    if weights == "random":
        keras.utils.set_random_seed(seed)
        model = spec.build(image_size, None)
    elif weights == "imagenet":
        if not spec.has_imagenet:
            raise WeightsError(f"Backbone {spec.name} has no ImageNet weights; use --weights random or PATH.")
        try:
            model = spec.build(image_size, "imagenet")
        except Exception as exc:  # urllib, ssl, OSError: all mean "no weights file here"
            raise WeightsError(
                f"Could not get ImageNet weights for {spec.name} ({type(exc).__name__}: {_first_line(exc)}). "
                "Offline? Pass --weights PATH to a local Keras weights file, or --weights random for a smoke run."
            ) from exc
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"Weights file {weights} does not exist. Received: weights={weights!r}")
        try:
            model = spec.build(image_size, None)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # Keras warns, not raises, when it skips layers it cannot match
                model.load_weights(str(path))
        except Exception as exc:
            raise WeightsError(
                f"Weights file {weights} does not fit {spec.name} ({type(exc).__name__}: {_first_line(exc)})."
            ) from exc
    return model


def hash_weights(model) -> str:
    """SHA-256 over every weight array (shape and bytes, in layer order): the weights identity."""
    digest = hashlib.sha256()
    for array in model.get_weights():
        array = np.ascontiguousarray(array, dtype=np.float32)
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def build_extractor(spec: BackboneSpec, backbone, image_size: int):
    """uint8 RGB (n, s, s, 3) -> feature maps (n, h, w, c): preprocessing + frozen backbone."""
    import keras

    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    x = inputs
    for layer in build_preprocessing(spec, image_size):
        x = layer(x)
    features = backbone(x, training=False)  # training=False keeps BatchNorm in inference mode
    return keras.Model(inputs, features, name=f"{spec.name}_extractor")


def check_image_size(spec: BackboneSpec, image_size: int) -> None:
    if image_size < spec.reduction or image_size % spec.reduction:
        raise FeatcacheError(
            f"--image-size must be a positive multiple of {spec.reduction} for {spec.name}. "
            f"Received: image_size={image_size}"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def load_cached_backbone(cache_path: str | Path, manifest: dict):
    """Rebuild the frozen backbone exactly as a cache was extracted with it.

    Random weights come from ``<cache stem>.weights.h5`` beside the cache, a weights file from the
    path in the manifest, ImageNet weights from Keras's download cache.

    Raises:
        WeightsError: the weights are gone or no longer hash to the manifest's ``weights.sha256``.
    """
    spec = get_backbone_spec(manifest["backbone"])
    source = manifest["weights"]["source"]
    cache_path = Path(cache_path)
    if source == "random":
        weights = str(cache_path.with_name(f"{cache_path.stem}.weights.h5"))
    elif source == "file":
        weights = manifest["weights"]["path"]
    else:
        weights = "imagenet"
    model = load_backbone(spec, manifest["image_size"], weights, seed=manifest["seed"])
    found = hash_weights(model)
    if found != manifest["weights"]["sha256"]:
        raise WeightsError(
            f"The {spec.name} weights ({weights}) hash to {found[:12]}, but {cache_path.name} was built with "
            f"{manifest['weights']['sha256'][:12]}; restore the original weights or re-run 'featcache extract'."
        )
    return model
