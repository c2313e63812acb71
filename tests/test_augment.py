import numpy as np
import pytest

from featcache.augment import AugmentSpec, augment_image

SHA = "ab" * 32


def _image(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)


def test_copy_is_a_function_of_content_copy_and_seed():
    image = _image()
    a = augment_image(image, 1, seed=3, content_sha256=SHA)
    assert a.shape == image.shape and a.dtype == np.uint8
    assert (a == augment_image(image.copy(), 1, seed=3, content_sha256=SHA)).all()
    assert not (a == augment_image(image, 2, seed=3, content_sha256=SHA)).all()
    assert not (a == augment_image(image, 1, seed=4, content_sha256=SHA)).all()
    assert not (a == augment_image(image, 1, seed=3, content_sha256="cd" * 32)).all()
    assert not (a == image).all()


def test_zero_ranges_are_the_identity():
    image = _image()
    spec = AugmentSpec(rotation=0.0, zoom=0.0, shift=0.0)
    assert (augment_image(image, 1, 0, SHA, spec) == image).all()


def test_pure_shift_moves_pixels():
    image = np.zeros((40, 40, 3), np.uint8)
    image[20, 20] = 255
    spec = AugmentSpec(rotation=0.0, zoom=0.0, shift=0.2)
    out = augment_image(image, 1, 0, SHA, spec)
    assert out.max() > 0 and not out[20, 20].any()  # the bright pixel went somewhere else


def test_original_is_never_augmented():
    with pytest.raises(ValueError, match="copy indices must be >= 1"):
        augment_image(_image(), 0, 0, SHA)


def test_batched_copies_equal_single_copies_and_rotation_is_about_the_center():
    from featcache.augment import augment_copies

    image = _image()
    batch = augment_copies(image, [1, 2, 3], seed=0, content_sha256=SHA)
    for i, k in enumerate((1, 2, 3)):
        assert (batch[i] == augment_image(image, k, 0, SHA)).all()
    square = np.zeros((41, 41, 3), np.uint8)
    square[20, 20] = 255  # the center pixel stays put under a pure rotation
    spec = AugmentSpec(rotation=30.0, zoom=0.0, shift=0.0)
    assert augment_image(square, 1, 0, SHA, spec)[20, 20].max() == 255
