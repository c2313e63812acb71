"""The ``keras.applications`` architectures featcache can use as backbones: constructor name, the
preprocessing mode its ImageNet weights expect, its default and minimum input side.

Data only (no Keras import), read from each module's ``preprocess_input`` and ``obtain_input_shape`` call in
Keras 3: ``caffe`` (RGB->BGR, minus the ImageNet mean), ``torch`` (/255, minus mean, over std), ``tf``
(to [-1, 1]) or ``none``: the model rescales its 0-255 input itself (``include_preprocessing``, default on).
"""

from __future__ import annotations

# constructor -> (preprocessing mode, default input side, minimum input side)
APPLICATIONS: dict[str, tuple[str, int, int]] = {
    **{f"ConvNeXt{size}": ("none", 224, 32) for size in ("Tiny", "Small", "Base", "Large", "XLarge")},
    **{f"DenseNet{depth}": ("torch", 224, 32) for depth in (121, 169, 201)},
    **{f"EfficientNetB{i}": ("none", side, 32)
       for i, side in enumerate((224, 240, 260, 300, 380, 456, 528, 600))},
    **{f"EfficientNetV2{variant}": ("none", side, 32)
       for variant, side in (("B0", 224), ("B1", 240), ("B2", 260), ("B3", 300), ("S", 384), ("M", 480), ("L", 480))},
    "InceptionResNetV2": ("tf", 299, 75),
    "InceptionV3": ("tf", 299, 75),
    "MobileNet": ("tf", 224, 32),
    "MobileNetV2": ("tf", 224, 32),
    "MobileNetV3Large": ("none", 224, 32),
    "MobileNetV3Small": ("none", 224, 32),
    "NASNetLarge": ("tf", 331, 32),
    "NASNetMobile": ("tf", 224, 32),
    **{f"ResNet{depth}": ("caffe", 224, 32) for depth in (50, 101, 152)},
    **{f"ResNet{depth}V2": ("tf", 224, 32) for depth in (50, 101, 152)},
    "VGG16": ("caffe", 224, 32),
    "VGG19": ("caffe", 224, 32),
    "Xception": ("tf", 299, 71),
}


def registry_key(name: str) -> str:
    """The spelling-insensitive key of a backbone name: lower case, without ``_``, ``-`` and spaces
    (``ConvNeXtTiny``, ``convnext_tiny`` and ``convnext-tiny`` are all ``convnexttiny``)."""
    return "".join(ch for ch in name.lower() if ch not in "_- ")


def build_application(constructor: str, image_size: int, weights: str | None):
    """``keras.applications.<constructor>(include_top=False)`` at ``image_size``; ``weights`` as Keras takes it."""
    import keras

    return getattr(keras.applications, constructor)(
        include_top=False, weights=weights, input_shape=(image_size, image_size, 3)
    )
