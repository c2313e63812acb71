"""``data.decode_and_resize`` and its helpers: the same pixels as Pillow (what Keras's ``load_img`` and the
reference's ``flow_from_directory`` read), hostile images, the decode version in the fingerprint."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from featcache.data import RESIZE, decode_bytes, decode_rgb

# What data.RESIZE said before the accurate JPEG decode (featcache 0.1.0, decode version 1).
OLD_RESIZE = {
    "decode": "tf.io.decode_image(channels=3, dtype=uint8)",
    "method": "bilinear",
    "antialias": True,
    "aspect": "stretched to a square",
    "output": "uint8, rounded",
}


def decode_full(encoded: bytes) -> np.ndarray:
    """The decode step of ``decode_and_resize`` without the resize: (h, w, 3) uint8."""
    return decode_rgb(tf.constant(encoded)).numpy()


def pillow_rgb(encoded: bytes) -> np.ndarray:
    """What ``keras.utils.load_img`` does before resizing: ``Image.open(...).convert("RGB")``."""
    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_every_dev_jpeg_decodes_to_pillows_pixels(dev_data):
    files = sorted(dev_data.rglob("*.jpeg"))
    assert len(files) == 451
    for file in files:
        encoded = file.read_bytes()
        ours, pillow = decode_full(encoded), pillow_rgb(encoded)
        assert ours.shape == pillow.shape and np.array_equal(ours, pillow), file.name


def test_the_fast_idct_would_differ(dev_data):
    """The reason for the accurate decode: tf.io.decode_image's fast IDCT misses Pillow's pixels."""
    encoded = sorted(dev_data.rglob("*.jpeg"))[0].read_bytes()
    fast = tf.io.decode_image(encoded, channels=3, expand_animations=False).numpy()
    assert not np.array_equal(fast, pillow_rgb(encoded))


def _gradient(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1).astype(np.uint8)


RNG = np.random.default_rng(0)
HOSTILE = {  # name -> encoded bytes; each must decode to exactly Pillow's RGB conversion
    "progressive-rgb.jpeg": encode(Image.fromarray(_gradient(40, 60)), "JPEG", quality=90, progressive=True),
    "progressive-gray.jpeg": encode(Image.fromarray(_gradient(40, 60)[..., 0]), "JPEG", progressive=True),
    "gray-alpha.png": encode(Image.fromarray(RNG.integers(0, 256, (30, 20, 2), dtype=np.uint8), "LA"), "PNG"),
    "rgba.png": encode(Image.fromarray(RNG.integers(0, 256, (30, 20, 4), dtype=np.uint8), "RGBA"), "PNG"),
    "palette.png": encode(Image.fromarray(_gradient(30, 20)).convert("P"), "PNG"),
    "1-bit.png": encode(Image.fromarray(RNG.random((17, 23)) > 0.5), "PNG"),
    "1x1.jpeg": encode(Image.fromarray(np.full((1, 1, 3), 200, np.uint8)), "JPEG"),
    "1x1.png": encode(Image.fromarray(np.full((1, 1), 7, np.uint8)), "PNG"),
    "4000x3.jpeg": encode(Image.fromarray(RNG.integers(0, 256, (3, 4000), dtype=np.uint8)), "JPEG"),
    "3x4000.png": encode(Image.fromarray(RNG.integers(0, 256, (4000, 3, 3), dtype=np.uint8)), "PNG"),
    "rgb16.png": tf.io.encode_png(RNG.integers(0, 2**16, (9, 11, 3)).astype(np.uint16)).numpy(),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_images_decode_like_pillow_and_resize(name):
    encoded = HOSTILE[name]
    ours, pillow = decode_full(encoded), pillow_rgb(encoded)
    assert ours.shape == pillow.shape and np.array_equal(ours, pillow)
    resized = decode_bytes(encoded, 32, name=name)
    assert resized.shape == (32, 32, 3) and resized.dtype == np.uint8


def test_16_bit_gray_keeps_the_high_byte():
    """Pillow opens 16-bit gray as mode I;16 and clips it to 255 in convert("RGB"); we keep the high byte."""
    gray = RNG.integers(0, 2**16, (9, 11, 1)).astype(np.uint16)
    ours = decode_full(tf.io.encode_png(gray).numpy())
    assert np.array_equal(ours, np.repeat(gray >> 8, 3, axis=2).astype(np.uint8))


def test_adobe_cmyk_jpeg_is_within_one_level_of_pillow():
    """libjpeg writes CMYK JPEGs inverted with an Adobe marker (as Photoshop does); TensorFlow and Pillow
    both undo that and convert to RGB, rounding C*K/255 differently by at most one level."""
    cmyk = np.kron(RNG.integers(0, 256, (6, 8, 4), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
    encoded = encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95)
    assert b"Adobe" in encoded[:100]
    ours, pillow = decode_full(encoded).astype(int), pillow_rgb(encoded).astype(int)
    assert ours.shape == pillow.shape and np.abs(ours - pillow).max() <= 1


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "WEBP"])
def test_other_formats_are_a_clear_error(fmt):
    from featcache.errors import DataError

    encoded = encode(Image.fromarray(_gradient(8, 8)), fmt)
    with pytest.raises(DataError, match="Unknown image file format; featcache reads JPEG and PNG"):
        decode_bytes(encoded, 32, name=f"x.{fmt.lower()}")


def test_the_decode_version_is_hashed_into_the_fingerprint(extract_config, small_xrays, monkeypatch):
    """The real fingerprint builder: a cache of the old decode gets another fingerprint, so another file."""
    from featcache import extract
    from featcache.backbones import get_backbone_spec
    from featcache.cache import compute_fingerprint

    config, spec = extract_config(small_xrays), get_backbone_spec("tiny")
    new = compute_fingerprint(extract._feature_settings(config, spec, "0" * 64, "float32"))
    monkeypatch.setattr(extract, "RESIZE", OLD_RESIZE)
    old = compute_fingerprint(extract._feature_settings(config, spec, "0" * 64, "float32"))
    monkeypatch.setattr(extract, "RESIZE", {**RESIZE, "decode_version": RESIZE["decode_version"] + 1})
    bumped = compute_fingerprint(extract._feature_settings(config, spec, "0" * 64, "float32"))
    assert len({new, old, bumped}) == 3


def test_an_old_decode_cache_is_not_reused_and_not_assembled(extract_config, small_xrays, monkeypatch):
    from featcache import extract
    from featcache.assemble import check_decoding
    from featcache.cache import read_manifest
    from featcache.errors import CacheMismatchError

    with monkeypatch.context() as patch:
        patch.setattr(extract, "RESIZE", OLD_RESIZE)
        (old,) = extract.extract_features(extract_config(small_xrays, augment_copies=0))
    (new,) = extract.extract_features(extract_config(small_xrays, augment_copies=0))
    assert new.cache_path != old.cache_path and old.cache_path.is_file()
    assert new.reused_rows == 0 and new.computed_rows == new.counts["rows"]
    assert read_manifest(new.cache_path)["resize"] == RESIZE
    check_decoding(new.cache_path, read_manifest(new.cache_path))
    with pytest.raises(CacheMismatchError, match="decoding version 1.*re-run 'featcache extract'"):
        check_decoding(old.cache_path, read_manifest(old.cache_path))
