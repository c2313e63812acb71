"""``augment.affine_bilinear`` gives exactly the pixels of TensorFlow's ImageProjectiveTransformV3 kernel, which
augmentation called before (AUGMENT_VERSION 2 names that kernel's output, so any difference would be a silent
change of every cache with augmented copies)."""

import numpy as np
import pytest
import tensorflow as tf

from featcache.augment import AugmentSpec, _transform, affine_bilinear, augment_copies

FILLS = ["nearest", "reflect", "wrap", "constant"]


def kernel(plane: np.ndarray, transforms: np.ndarray, fill: str) -> np.ndarray:
    """The TensorFlow kernel, called as augment.py called it up to this change (float32 in, fill value 0)."""
    images = np.repeat(plane[None, :, :, None].astype(np.float32), len(transforms), axis=0)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=tf.convert_to_tensor(transforms, tf.float32),
        output_shape=tf.constant(plane.shape, tf.int32), fill_value=tf.constant(0.0),
        interpolation="BILINEAR", fill_mode=fill.upper(),
    )
    return out.numpy()[..., 0]


def transforms_for(shape, spec, seeds) -> np.ndarray:
    return np.stack([_transform(shape, k, seed, f"{seed:064x}", spec) for seed in seeds for k in (1, 2, 3)])


@pytest.mark.parametrize("fill", FILLS)
def test_equals_the_kernel_for_the_default_ranges(fill):
    plane = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    transforms = transforms_for((64, 64, 3), AugmentSpec(fill=fill), range(40))
    np.testing.assert_array_equal(affine_bilinear(plane, transforms, fill), kernel(plane, transforms, fill))


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("shape", [(37, 53), (224, 224), (2, 5), (1, 7)])
def test_equals_the_kernel_far_outside_the_plane(fill, shape):
    """Wide ranges send source coordinates several sides away (reflect and wrap fold them back, constant fills
    them, nearest clamps them); odd, non-square and 1-pixel sides take the kernel's edge branches."""
    plane = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    spec = AugmentSpec(rotation=180.0, zoom=0.9, shift=2.5, fill=fill)
    transforms = transforms_for(shape + (3,), spec, range(25))
    np.testing.assert_array_equal(affine_bilinear(plane, transforms, fill), kernel(plane, transforms, fill))


def test_equals_the_kernel_on_hand_made_rows():
    """Integer and half-pixel offsets, exact edges, a mirror and a large scale: the rounding corner cases."""
    plane = np.random.default_rng(2).integers(0, 256, (16, 16), dtype=np.uint8)
    rows = np.array([
        [1, 0, 0, 0, 1, 0, 0, 0], [1, 0, 0.5, 0, 1, -0.5, 0, 0], [1, 0, 15, 0, 1, -15, 0, 0],
        [-1, 0, 15, 0, 1, 0, 0, 0], [7.3, 0.2, -40, -0.1, 6.9, 33, 0, 0], [0, 1, 0, 1, 0, 0, 0, 0],
        [1, 0, -16, 0, 1, 16, 0, 0], [1, 0, 31.999, 0, 1, -32.001, 0, 0],
    ], np.float32)
    for fill in FILLS:
        np.testing.assert_array_equal(affine_bilinear(plane, rows, fill), kernel(plane, rows, fill))


def test_colour_images_are_transformed_channel_by_channel():
    image = np.random.default_rng(3).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    spec = AugmentSpec()
    copies = augment_copies(image, [1, 2], 5, "ef" * 32, spec)
    transforms = np.stack([_transform(image.shape, k, 5, "ef" * 32, spec) for k in (1, 2)])
    for c in range(3):
        expected = np.clip(np.rint(kernel(image[:, :, c], transforms, spec.fill)), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(copies[..., c], expected)


def test_projective_rows_and_unknown_fills_are_refused():
    plane = np.zeros((8, 8), np.uint8)
    with pytest.raises(ValueError, match="affine"):
        affine_bilinear(plane, np.array([[1, 0, 0, 0, 1, 0, 0.01, 0]]), "nearest")
    with pytest.raises(ValueError, match="fill must be"):
        affine_bilinear(plane, np.array([[1, 0, 3, 0, 1, 0, 0, 0]]), "mirror")
