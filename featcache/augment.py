"""Seeded, pure augmentation: random rotation, zoom and shift, as Keras's ImageDataGenerator did.

Copy ``k`` of an image is a function of (image content, k, seed) alone, so a resumed or
incremental run recomputes exactly the same pixels. Bump ``AUGMENT_VERSION`` whenever the
output of ``augment_image`` changes: it is part of every cache fingerprint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

AUGMENT_VERSION = 2  # 2: TF ImageProjectiveTransformV3 instead of scipy.ndimage (1)


@dataclass(frozen=True)
class AugmentSpec:
    """Ranges of the random transform (uniform draws).

    Attributes:
        rotation: degrees, drawn from [-rotation, rotation].
        zoom: scale drawn from [1 - zoom, 1 + zoom]; above 1 zooms in.
        shift: fraction of the side, drawn per axis from [-shift, shift].
        fill: how pixels outside the source are filled: nearest, reflect, wrap or constant (0).
    """

    rotation: float = 10.0
    zoom: float = 0.1
    shift: float = 0.1
    fill: str = "nearest"

    def describe(self) -> dict:
        return {**asdict(self), "version": AUGMENT_VERSION, "interpolation": "bilinear"}


def augment_image(image: np.ndarray, copy_index: int, seed: int, content_sha256: str,
                  spec: AugmentSpec = AugmentSpec()) -> np.ndarray:
    """One augmented copy of an image: ``augment_copies`` for a single copy index."""
    return augment_copies(image, [copy_index], seed, content_sha256, spec)[0]


def augment_copies(image: np.ndarray, copy_indices: list[int], seed: int, content_sha256: str,
                   spec: AugmentSpec = AugmentSpec()) -> np.ndarray:
    """Augmented copies of one image, all in one TensorFlow call.

    Args:
        image: (s, s, 3) uint8, already at the cache's image size.
        copy_indices: 1, 2, ... (0 is the original and is never augmented).
        seed: the run's seed.
        content_sha256: hex SHA-256 of the source file, so identical content gives identical copies.
        spec: transform ranges.

    Returns:
        (len(copy_indices), s, s, 3) uint8.
    """
    import tensorflow as tf

    if min(copy_indices, default=1) < 1:
        raise ValueError(f"copy indices must be >= 1 for augmented copies. Received: copy_indices={copy_indices}")
    transforms = np.stack([_transform(image.shape, k, seed, content_sha256, spec) for k in copy_indices])
    # A gray image (three equal channels: every chest X-ray) is transformed in one channel and repeated: the
    # kernel samples each channel on its own at the same coordinates, so the pixels are the same, at a third
    # of the cost (tests/test_one_channel.py checks it).
    gray = image.ndim == 3 and image.shape[2] == 3 and _equal_channels(image)
    source = image[:, :, :1] if gray else image
    images = tf.repeat(tf.convert_to_tensor(source[None], tf.float32), len(copy_indices), axis=0)
    # The kernel of keras.layers.RandomRotation/RandomZoom: bilinear, C++, all channels at once.
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=tf.convert_to_tensor(transforms, tf.float32),
        output_shape=tf.constant(image.shape[:2], tf.int32), fill_value=tf.constant(0.0),
        interpolation="BILINEAR", fill_mode=spec.fill.upper(),
    )
    pixels = np.clip(np.rint(out.numpy()), 0, 255).astype(np.uint8)
    return np.concatenate([pixels] * 3, axis=3) if gray else pixels  # 3x faster than np.repeat on the last axis


def _equal_channels(image: np.ndarray) -> bool:
    """Whether the three channels of an (h, w, 3) image are equal (a gray image stored as RGB)."""
    return bool(np.array_equal(image[:, :, 0], image[:, :, 1]) and np.array_equal(image[:, :, 0], image[:, :, 2]))


def _transform(shape: tuple[int, ...], copy_index: int, seed: int, content_sha256: str,
               spec: AugmentSpec) -> np.ndarray:
    """The 8 projective parameters mapping output pixel (x=col, y=row) to its source pixel."""
    rng = np.random.default_rng([seed, copy_index, int(content_sha256[:16], 16)])
    angle = math.radians(rng.uniform(-spec.rotation, spec.rotation))
    scale = rng.uniform(1.0 - spec.zoom, 1.0 + spec.zoom)
    shift = rng.uniform(-spec.shift, spec.shift, size=2) * np.array(shape[:2])
    # source = R(angle) / scale @ (output - center - shift) + center, in (x, y) pixel coordinates
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    matrix = np.array([[cos, -sin], [sin, cos]])
    center = (np.array([shape[1], shape[0]], dtype=float) - 1) / 2
    offset = center - matrix @ (center + shift[::-1])
    return np.array([matrix[0, 0], matrix[0, 1], offset[0], matrix[1, 0], matrix[1, 1], offset[1], 0.0, 0.0])
