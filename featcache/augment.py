"""Seeded, pure augmentation: random rotation, zoom and shift, as Keras's ImageDataGenerator did.

Copy ``k`` of an image is a function of (image content, k, seed) alone, so a resumed or
incremental run recomputes exactly the same pixels. Bump ``AUGMENT_VERSION`` whenever the
output of ``augment_image`` changes: it is part of every cache fingerprint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

AUGMENT_VERSION = 1


@dataclass(frozen=True)
class AugmentSpec:
    """Ranges of the random transform (uniform draws).

    Attributes:
        rotation: degrees, drawn from [-rotation, rotation].
        zoom: scale drawn from [1 - zoom, 1 + zoom]; above 1 zooms in.
        shift: fraction of the side, drawn per axis from [-shift, shift].
        fill: how pixels outside the source are filled (scipy.ndimage mode).
    """

    rotation: float = 10.0
    zoom: float = 0.1
    shift: float = 0.1
    fill: str = "nearest"

    def describe(self) -> dict:
        return {**asdict(self), "version": AUGMENT_VERSION, "interpolation": "bilinear"}


def augment_image(image: np.ndarray, copy_index: int, seed: int, content_sha256: str,
                  spec: AugmentSpec = AugmentSpec()) -> np.ndarray:
    """One augmented copy of an image.

    Args:
        image: (s, s, 3) uint8, already at the cache's image size.
        copy_index: 1, 2, ... (0 is the original and is never augmented).
        seed: the run's seed.
        content_sha256: hex SHA-256 of the source file, so identical content gives identical copies.
        spec: transform ranges.

    Returns:
        (s, s, 3) uint8.
    """
    if copy_index < 1:
        raise ValueError(f"copy_index must be >= 1 for augmented copies. Received: copy_index={copy_index}")
    rng = np.random.default_rng([seed, copy_index, int(content_sha256[:16], 16)])
    angle = math.radians(rng.uniform(-spec.rotation, spec.rotation))
    scale = rng.uniform(1.0 - spec.zoom, 1.0 + spec.zoom)
    side = image.shape[0]
    shift = rng.uniform(-spec.shift, spec.shift, size=2) * side
    # affine_transform maps output coordinates to input ones: input = matrix @ output + offset.
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    matrix = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    center = np.array([(side - 1) / 2, (image.shape[1] - 1) / 2, 0.0])
    offset = center - matrix @ (center + np.array([shift[0], shift[1], 0.0]))
    out = ndimage.affine_transform(image.astype(np.float32), matrix, offset=offset, order=1, mode=spec.fill)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
