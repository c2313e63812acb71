"""Seeded, pure augmentation: random rotation, zoom and shift, as Keras's ImageDataGenerator did.

Copy ``k`` of an image is a function of (image content, k, seed) alone, so a resumed or
incremental run recomputes exactly the same pixels. Bump ``AUGMENT_VERSION`` whenever the
output of ``augment_image`` changes: it is part of every cache fingerprint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

AUGMENT_VERSION = 2  # 2: TF ImageProjectiveTransformV3 instead of scipy.ndimage (1); now replayed in numpy, same pixels
FILL_MODES = ("nearest", "reflect", "wrap", "constant")
STEP = 32768  # float32 values per block of output rows in affine_bilinear (128 KiB temporaries)
_PAD = 2  # zero rows and columns around a plane, see _bilinear


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
    """Augmented copies of one image, each through ``affine_bilinear``.

    Args:
        image: (s, s, 3) uint8, already at the cache's image size.
        copy_indices: 1, 2, ... (0 is the original and is never augmented).
        seed: the run's seed.
        content_sha256: hex SHA-256 of the source file, so identical content gives identical copies.
        spec: transform ranges.

    Returns:
        (len(copy_indices), s, s, 3) uint8.
    """
    if min(copy_indices, default=1) < 1:
        raise ValueError(f"copy indices must be >= 1 for augmented copies. Received: copy_indices={copy_indices}")
    transforms = np.stack([_transform(image.shape, k, seed, content_sha256, spec) for k in copy_indices])
    # A gray image (three equal channels: every chest X-ray) is transformed in one channel and repeated: each
    # channel is sampled on its own at the same coordinates, so the pixels are the same, at a third of the cost
    # (tests/test_one_channel.py checks it).
    channels = 1 if image.ndim == 3 and image.shape[2] == 3 and _equal_channels(image) else image.shape[2]
    planes = [_round_to_uint8(affine_bilinear(image[:, :, c], transforms, spec.fill)) for c in range(channels)]
    if channels == 1:
        planes *= 3
    return np.stack(planes, axis=3)


def _round_to_uint8(values: np.ndarray) -> np.ndarray:
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return values.astype(np.uint8)


def affine_bilinear(plane: np.ndarray, transforms: np.ndarray, fill: str) -> np.ndarray:
    """One (h, w) uint8 plane resampled through each affine transform, bilinear: (n, h, w) float32.

    The arithmetic of TensorFlow's ``ImageProjectiveTransformV3`` kernel (the kernel of Keras's
    RandomRotation/RandomZoom, which featcache called up to this version) replayed in numpy, float32 operation
    for float32 operation, so the output is bit-identical (tests/test_augment_kernel.py compares the two over
    every fill mode and far-out coordinates) at half the CPU time: the kernel evaluates each output pixel
    through a generic per-coefficient generator; here each step is one vectorised pass, and the four
    neighbours of a pixel are fetched in one gather of a 4-byte word.

    Args:
        plane: (h, w) uint8.
        transforms: (n, 8) rows ``[a0, a1, a2, b0, b1, b2, 0, 0]``: output pixel (x=col, y=row) samples the
            source at (a0 x + a1 y + a2, b0 x + b1 y + b2). Projective rows (last two not 0) are refused.
        fill: nearest, reflect, wrap or constant (0), as the kernel's ``fill_mode``.
    """
    if fill not in FILL_MODES:
        raise ValueError(f"fill must be nearest, reflect, wrap or constant. Received: fill={fill!r}")
    transforms = np.asarray(transforms, np.float32)
    if transforms.ndim != 2 or transforms.shape[1] != 8 or transforms[:, 6:].any():
        raise ValueError(f"affine_bilinear takes (n, 8) affine rows (last two 0). Received: shape={transforms.shape}")
    n, (h, w) = len(transforms), plane.shape
    # Output rows of every copy, one after the other. Per row the kernel's source x is
    # (a0 * col + a1 * row) + a2 (its division by 0 * col + 0 * row + 1 is exact), and y likewise.
    index = np.arange(h, dtype=np.float32)
    per_row = {name: np.repeat(transforms[:, i], h)[:, None] for i, name in enumerate(("a0", "a1", "a2", "b0", "b1", "b2"))}
    row_of = np.tile(index, n)[:, None]
    per_row["a1"] = per_row["a1"] * row_of
    per_row["b1"] = per_row["b1"] * row_of
    cols = np.arange(w, dtype=np.float32)[None, :]
    quads = _neighbour_quads(plane, _PAD)
    out = np.empty((n * h, w), np.float32)
    # Blocks of rows small enough (STEP values: 128 KiB per float32 temporary) that numpy's temporaries stay in cache and come
    # from the heap instead of fresh pages: whole-image temporaries cost 3,400 page faults a call in a process
    # running TensorFlow, more than the arithmetic.
    step = max(1, STEP // w)
    for start in range(0, n * h, step):
        rows = slice(start, start + step)
        x = per_row["a0"][rows] * cols
        x += per_row["a1"][rows]
        x += per_row["a2"][rows]
        y = per_row["b0"][rows] * cols
        y += per_row["b1"][rows]
        y += per_row["b2"][rows]
        _bilinear(quads, _map_coordinate(x, w, fill), _map_coordinate(y, h, fill), fill, out[rows])
    return out.reshape(n, h, w)


def _bilinear(quads: np.ndarray, x: np.ndarray, y: np.ndarray, fill: str, out: np.ndarray) -> None:
    """The kernel's bilinear read at source coordinates (x, y), into ``out``; x and y are used up.

    Neighbours outside the plane read the fill value, 0. After nearest/reflect/wrap the floor is in [0, len-1]
    and the ceiling at most len; constant fill leaves coordinates anywhere, so they are clamped to [-2, len],
    where both neighbours of a clamped floor are outside too, and the plane has 2 zero rows/columns each side.
    """
    h, w = quads.shape[0] + 1 - 2 * _PAD, quads.shape[1] + 1 - 2 * _PAD
    x_floor, y_floor = np.floor(x), np.floor(y)
    # The flat index of each quad, computed in floating point (exact: integers below 2**24, or float64 beyond).
    exact = np.float32 if quads.size < 2**24 else np.float64
    if fill == "constant":
        index = np.clip(y_floor, -_PAD, h, dtype=exact)
        index *= quads.shape[1]
        index += np.clip(x_floor, -_PAD, w)
    else:
        index = np.multiply(y_floor, quads.shape[1], dtype=exact)
        index += x_floor
    index += _PAD * quads.shape[1] + _PAD
    corners = quads.reshape(-1).take(index.astype(np.intp)).view(np.uint8).reshape(*x.shape, 4).astype(np.float32)
    # The kernel: (x_ceil - x) * f(x_floor) + (x - x_floor) * f(x_ceil) on each row, then the same along y, with
    # x_ceil = x_floor + 1. Same operations in the same order, in place where an operand is no longer needed.
    right = np.subtract(x, x_floor)
    left = x_floor
    left += 1
    left -= x
    top = np.multiply(left, corners[..., 0])
    np.multiply(right, corners[..., 1], out=x)
    top += x
    np.multiply(left, corners[..., 2], out=left)
    np.multiply(right, corners[..., 3], out=right)
    bottom = left
    bottom += right
    below = np.subtract(y, y_floor, out=right)
    above = y_floor
    above += 1
    above -= y
    np.multiply(top, above, out=out)
    bottom *= below
    out += bottom


def _neighbour_quads(plane: np.ndarray, pad: int) -> np.ndarray:
    """(h + 2 pad - 1, w + 2 pad - 1) uint32: the pixels at (r, c), (r, c+1), (r+1, c), (r+1, c+1) of the
    zero-padded plane, one byte each, so one gather fetches all four."""
    h, w = plane.shape
    padded = np.zeros((h + 2 * pad, w + 2 * pad), np.uint8)
    padded[pad:pad + h, pad:pad + w] = plane
    quads = np.empty((h + 2 * pad - 1, w + 2 * pad - 1, 4), np.uint8)
    quads[..., 0], quads[..., 1] = padded[:-1, :-1], padded[:-1, 1:]
    quads[..., 2], quads[..., 3] = padded[1:, :-1], padded[1:, 1:]
    return quads.view(np.uint32)[..., 0]


def _map_coordinate(coord: np.ndarray, length: int, fill: str) -> np.ndarray:
    """The kernel's ``MapCoordinate``: source coordinates outside [0, length - 1] mapped back per fill mode."""
    if fill == "constant":
        return coord
    last = np.float32(length - 1)
    if length <= 1:
        return np.zeros_like(coord)
    if fill in ("reflect", "wrap"):
        below, above = coord < 0, coord > last  # one branch each, as in the kernel: a folded value is not refolded
    if fill == "reflect":  # [abcd] -> [dcba|abcd|dcba]
        span = np.float32(2 * length)
        low = coord[below]
        low = span * np.trunc(-low / span) + low  # in the kernel: sz2 * int64(-x / sz2) + x
        coord[below] = np.where(low < -length, low + span, -low - np.float32(1))
        high = coord[above]
        high -= span * np.trunc(high / span)
        coord[above] = np.where(high >= length, span - high - np.float32(1), high)
    elif fill == "wrap":  # [abcd] -> [abcd|abcd|abcd]
        low = coord[below]
        coord[below] = low + np.float32(length) * (np.trunc(-low / last) + np.float32(1))
        high = coord[above]
        coord[above] = high - np.float32(length) * np.trunc(high / last)
    return np.clip(coord, np.float32(0), last, out=coord)


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
