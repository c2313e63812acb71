"""Backbone registry: name -> spec (architecture, preprocessing, input size, feature shape), weight loading
and the cut at ``--feature-layer``.

vgg16, resnet152 and tiny are registered as they always were; every other ``keras.applications``
architecture is registered from ``featcache.applications``. Preprocessing is bound to each entry and built
from standard Keras layers, so the model that extraction runs and the model that export saves are one
definition (and loads in safe mode).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from featcache.applications import APPLICATIONS, build_application, registry_key
from featcache.errors import FeatcacheError, WeightsError
from featcache.feature_layers import select_feature_layer

log = logging.getLogger(__name__)

# ImageNet channel means in BGR order, as in keras.applications.imagenet_utils (mode="caffe").
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


PREPROCESSING_MODES = ("caffe", "torch", "tf", "none")
# ImageNet channel statistics of torch mode, in RGB order, as in keras.applications.imagenet_utils.
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone.

    Attributes:
        name: registry key, also the CLI value of ``--backbone`` (any spelling ``applications.registry_key``
            maps to it is accepted).
        build: ``build(image_size, weights) -> keras.Model`` without top; ``weights`` is
            ``None``, ``"imagenet"`` or a file path, as keras.applications takes it.
        channels: channels of the last feature map; None where the shape is read off the built model.
        preprocessing: ``caffe``, ``torch``, ``tf`` or ``none`` (see ``build_preprocessing``).
        reduction: spatial stride of the backbone (224 px -> 7x7 at 32); where set, ``--image-size`` must be
            a multiple of it (the original entries); else any side from ``min_size`` up is taken.
        has_imagenet: whether ``weights="imagenet"`` exists for this entry.
        default_size: the input side used when ``--image-size`` is not given.
        min_size: the smallest input side the architecture takes.
        architecture: the ``keras.applications`` constructor, for the generic entries; it enters the fingerprint.
    """

    name: str
    build: Callable[[int, str | None], "keras.Model"]  # noqa: F821
    channels: int | None = None
    preprocessing: str = "caffe"
    reduction: int | None = 32
    has_imagenet: bool = True
    default_size: int = 224
    min_size: int = 32
    architecture: str | None = None

    def feature_shape(self, image_size: int, feature_layer: str | None = None) -> tuple[int, int, int]:
        """(h, w, c) of the maps at ``image_size``: by formula for the original entries, else read off the
        architecture built with uninitialised-by-ImageNet (``weights=None``) weights."""
        if self.channels is not None and self.reduction and feature_layer is None:
            side = image_size // self.reduction
            return (side, side, self.channels)
        model = select_feature_layer(self, self.build(image_size, None), feature_layer)
        return tuple(int(d) for d in model.output_shape[1:])


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


BACKBONES: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the registry under its name (a later entry of the same name is refused)."""
    if spec.name in BACKBONES or spec.name != registry_key(spec.name):
        raise ValueError(f"Backbone name {spec.name!r} is taken or not a registry key")
    if spec.preprocessing not in PREPROCESSING_MODES:
        raise ValueError(f"Unknown preprocessing {spec.preprocessing!r} of {spec.name!r}")
    BACKBONES[spec.name] = spec
    return spec


# The original entries, exactly as before the registry took any Keras architecture (their fingerprints
# are pinned in tests/test_backbone_pins.py).
register(BackboneSpec("vgg16", _build_vgg16, channels=512))
register(BackboneSpec("resnet152", _build_resnet152, channels=2048))
register(BackboneSpec("tiny", _build_tiny, channels=16, has_imagenet=False))
for _constructor, (_mode, _default, _minimum) in APPLICATIONS.items():
    if registry_key(_constructor) not in BACKBONES:
        register(BackboneSpec(registry_key(_constructor), partial(build_application, _constructor),
                              preprocessing=_mode, reduction=None, default_size=_default, min_size=_minimum,
                              architecture=_constructor))


def get_backbone_spec(name: str) -> BackboneSpec:
    """Look a backbone up in the registry; case, ``_``, ``-`` and spaces do not matter.

    Raises:
        FeatcacheError: the name is not registered (the message lists the known names).
    """
    key = registry_key(name)
    if key in BACKBONES:
        return BACKBONES[key]
    close = difflib.get_close_matches(key, BACKBONES, n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise FeatcacheError(
        f"Unknown backbone {name!r}; {hint}expected one of {', '.join(sorted(BACKBONES))} (any keras.applications "
        f"architecture; case, '_' and '-' do not matter). Received: backbone={name!r}"
    )


def describe_preprocessing(spec: BackboneSpec) -> dict:
    """The preprocessing of ``spec`` as recorded in the fingerprint and the manifest."""
    if spec.preprocessing == "caffe":
        return {"mode": "caffe", "mean_bgr": list(CAFFE_MEAN_BGR)}
    if spec.preprocessing == "torch":
        return {"mode": "torch", "scale": "1/255", "mean_rgb": list(TORCH_MEAN_RGB), "std_rgb": list(TORCH_STD_RGB)}
    if spec.preprocessing == "tf":
        return {"mode": "tf", "scale": "1/127.5", "offset": -1.0}
    return {"mode": "none", "note": f"{spec.architecture} rescales its 0-255 input itself"}


def build_preprocessing(spec: BackboneSpec, image_size: int):
    """uint8 RGB images (n, s, s, 3) -> the backbone's input, as standard layers only (no Lambda layer,
    so the exported model loads in safe mode).

    - caffe: ``x[..., ::-1] - mean_bgr``. A frozen Dense(3) whose kernel is the channel permutation and whose
      bias is ``-mean_bgr`` computes exactly that (each output is one input times 1.0 plus the bias).
    - torch: ``(x / 255 - mean) / std`` per RGB channel: Rescaling(1/255), then Normalization(mean, std**2).
    - tf: ``x / 127.5 - 1``: Rescaling(1/127.5, offset=-1).
    - none: a float cast only; the model's own layers rescale.
    """
    import keras

    to_float = keras.layers.Rescaling(1.0, name="preprocess_to_float")
    if spec.preprocessing == "caffe":
        caffe = keras.layers.Dense(3, name="preprocess_caffe", trainable=False)
        caffe.build((None, image_size, image_size, 3))
        permutation = np.eye(3, dtype="float32")[::-1]  # output j takes input channel 2 - j
        caffe.set_weights([permutation, -np.asarray(CAFFE_MEAN_BGR, dtype="float32")])
        return [to_float, caffe]
    if spec.preprocessing == "torch":
        return [to_float, keras.layers.Rescaling(1.0 / 255, name="preprocess_torch_scale"),
                keras.layers.Normalization(mean=list(TORCH_MEAN_RGB), variance=[s * s for s in TORCH_STD_RGB],
                                           name="preprocess_torch")]
    if spec.preprocessing == "tf":
        return [to_float, keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess_tf")]
    if spec.preprocessing == "none":
        return [to_float]
    raise FeatcacheError(f"Unsupported preprocessing {spec.preprocessing!r}. Received: backbone={spec.name!r}")


def load_backbone(spec: BackboneSpec, image_size: int, weights: str, seed: int, mixed: bool = False):
    """Build the frozen backbone with the requested weights.

    Args:
        spec: registry entry.
        image_size: square input side in pixels (``check_image_size``).
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


def build_extractor(spec: BackboneSpec, backbone, image_size: int, feature_layer: str | None = None):
    """uint8 RGB (n, s, s, 3) -> feature maps (n, h, w, c): preprocessing + frozen backbone, cut at
    ``feature_layer`` when given (``select_feature_layer``)."""
    import keras

    backbone = select_feature_layer(spec, backbone, feature_layer)
    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    x = inputs
    for layer in build_preprocessing(spec, image_size):
        x = layer(x)
    features = backbone(x, training=False)  # training=False keeps BatchNorm in inference mode
    return keras.Model(inputs, features, name=f"{spec.name}_extractor")


def resolve_image_size(spec: BackboneSpec, image_size: int | None) -> int:
    """``image_size``, or the backbone's own default side when it is None."""
    return spec.default_size if image_size is None else image_size


def check_image_size(spec: BackboneSpec, image_size: int) -> None:
    """The original entries take multiples of their stride; a Keras architecture any side from its minimum.

    Raises:
        FeatcacheError: the side does not fit.
    """
    if spec.reduction:
        if image_size < spec.reduction or image_size % spec.reduction:
            raise FeatcacheError(
                f"--image-size must be a positive multiple of {spec.reduction} for {spec.name}. "
                f"Received: image_size={image_size}"
            )
    elif image_size < spec.min_size:
        raise FeatcacheError(
            f"--image-size must be at least {spec.min_size} for {spec.name} (its default is {spec.default_size}). "
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
