"""Gray images decoded, resized and augmented in one channel (issue 9, part 4) give exactly the pixels of the
three-channel path they replace, so caches, fingerprints and parity are unchanged.

The reference here is the previous code, kept verbatim: ``tf.io.decode_jpeg``/``decode_png`` with
``channels=3``, the resize of three channels, and the projective transform of three float32 channels."""

import hashlib
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from featcache.augment import AugmentSpec, _transform, augment_copies
from featcache.decode import JPEG_RATIOS, JPEG_SCALE_MARGIN, decode_bytes, decode_pixels, decode_rgb

COPIES = [1, 2, 3, 4, 5]


def old_decode_and_resize(encoded: bytes, size: int, scaled: bool = False) -> np.ndarray:
    """``decode.decode_and_resize`` before the one-channel path: decode to RGB, resize three channels."""
    if encoded[:3] == b"\xff\xd8\xff":
        ratio = 1
        if scaled:
            shorter = int(min(tf.image.extract_jpeg_shape(encoded).numpy()[:2]))
            ratio = max(r for r in JPEG_RATIOS if r == 1 or shorter // r >= JPEG_SCALE_MARGIN * size)
        image = tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE", ratio=ratio)
    else:
        image = tf.io.decode_png(encoded, channels=3, dtype=tf.uint8)
    image = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8).numpy()


def old_augment_copies(image, copy_indices, seed, sha, spec=AugmentSpec()) -> np.ndarray:
    """``augment.augment_copies`` before the one-channel path: three float32 channels through the kernel."""
    transforms = np.stack([_transform(image.shape, k, seed, sha, spec) for k in copy_indices])
    images = tf.repeat(tf.convert_to_tensor(image[None], tf.float32), len(copy_indices), axis=0)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=tf.convert_to_tensor(transforms, tf.float32),
        output_shape=tf.constant(image.shape[:2], tf.int32), fill_value=tf.constant(0.0),
        interpolation="BILINEAR", fill_mode=spec.fill.upper(),
    )
    return np.clip(np.rint(out.numpy()), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def full_resolution(dev_data, count: int) -> list[bytes]:
    """Gray JPEGs of 1,000-2,500 px made from the dev images, as benchmarks/bench_host.py makes them."""
    rng = np.random.default_rng(1)
    sources = sorted((dev_data / "train").glob("*/*.jpeg"))[::37][:count]
    files = []
    for source in sources:
        width = int(rng.integers(1000, 2500))
        height = int(width * rng.uniform(0.75, 1.0))
        image = Image.open(source).convert("L").resize((width, height), Image.BICUBIC)
        files.append(encode(image, "JPEG", quality=92))
    return files


def assert_same_as_before(encoded: bytes, size: int, scaled: bool, name: str) -> None:
    ours = decode_bytes(encoded, size, name=name, scaled=scaled)
    before = old_decode_and_resize(encoded, size, scaled)
    assert ours.shape == before.shape == (size, size, 3) and np.array_equal(ours, before), (name, size, scaled)
    sha = hashlib.sha256(name.encode()).hexdigest()
    np.testing.assert_array_equal(augment_copies(ours, COPIES, 7, sha), old_augment_copies(before, COPIES, 7, sha),
                                  err_msg=f"{name} at {size} px, scaled={scaled}")


def test_gray_jpegs_decode_to_one_channel_and_rgb_files_to_three(dev_data):
    gray = (sorted(dev_data.rglob("*.jpeg"))[0]).read_bytes()
    assert decode_pixels(tf.constant(gray)).shape[-1] == 1
    colour = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)), "JPEG")
    assert decode_pixels(tf.constant(colour)).shape[-1] == 3
    assert decode_rgb(tf.constant(gray)).shape[-1] == 3


def test_every_dev_image_decodes_to_the_pixels_of_the_three_channel_path(dev_data):
    """Exact and fast decode of every dev image (140-512 px) at 64 px, where ``--decode fast`` decodes most at
    1/2; the augmented copies of every 10th (all of them: the slow test below)."""
    files = sorted(dev_data.rglob("*.jpeg"))
    assert len(files) == 451
    for i, file in enumerate(files):
        encoded = file.read_bytes()
        for scaled in (False, True):
            if i % 10 == 0:
                assert_same_as_before(encoded, 64, scaled, file.name)
            else:
                ours, before = decode_bytes(encoded, 64, scaled=scaled), old_decode_and_resize(encoded, 64, scaled)
                assert np.array_equal(ours, before), (file.name, scaled)


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 64])
def test_every_dev_image_gives_the_pixels_and_copies_of_the_three_channel_path(dev_data, size):
    """At 224 px the dev images decode whole; at 64 px ``--decode fast`` decodes most at 1/2. All 5 copies."""
    files = sorted(dev_data.rglob("*.jpeg"))
    assert len(files) == 451
    for file in files:
        for scaled in (False, True):
            assert_same_as_before(file.read_bytes(), size, scaled, file.name)


def test_full_resolution_jpegs_give_the_pixels_and_copies_of_the_three_channel_path(dev_data):
    """1,000-2,500 px, as the benchmark's: exact at full size, fast at 1/2 or 1/4 of it."""
    for i, encoded in enumerate(full_resolution(dev_data, 6)):
        for scaled in (False, True):
            assert_same_as_before(encoded, 224, scaled, f"full{i}.jpeg")


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "1", "I;16", "CMYK"])
def test_every_kind_of_file_gives_the_pixels_of_the_three_channel_path(mode):
    rng = np.random.default_rng(2)
    y, x = np.mgrid[0:90, 0:120]
    gray = ((x * 2 + y) % 256).astype(np.uint8)
    base = Image.fromarray(np.stack([gray, 255 - gray, (x * y) % 256], -1).astype(np.uint8))
    images = {"L": Image.fromarray(gray), "LA": Image.fromarray(np.stack([gray, gray[::-1]], -1), "LA"),
              "RGB": base, "RGBA": base.convert("RGBA"), "P": base.convert("P"),
              "1": Image.fromarray(rng.random((90, 120)) > 0.5),
              "I;16": Image.fromarray(gray.astype(np.uint16) * 257), "CMYK": base.convert("CMYK")}
    formats = {"L": ["PNG", "JPEG"], "RGB": ["PNG", "JPEG"], "CMYK": ["JPEG"]}.get(mode, ["PNG"])
    for fmt in formats:
        encoded = encode(images[mode], fmt)
        for size in (64, 32):
            assert_same_as_before(encoded, size, False, f"{mode}.{fmt}")
            assert_same_as_before(encoded, size, True, f"{mode}.{fmt}")


@pytest.mark.parametrize("fill", ["nearest", "reflect", "wrap", "constant"])
def test_augmenting_one_gray_channel_equals_augmenting_three(fill):
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (48, 40, 1), dtype=np.uint8)
    spec = AugmentSpec(rotation=30, zoom=0.3, shift=0.3, fill=fill)
    image = np.repeat(gray, 3, axis=2)
    ours = augment_copies(image, COPIES, 3, "cd" * 32, spec)
    assert ours.shape == (5, 48, 40, 3)
    np.testing.assert_array_equal(ours, old_augment_copies(image, COPIES, 3, "cd" * 32, spec))
    almost = image.copy()
    almost[5, 7, 2] ^= 1  # one channel differs in one pixel: the three-channel path
    ours = augment_copies(almost, COPIES, 3, "cd" * 32, spec)
    np.testing.assert_array_equal(ours, old_augment_copies(almost, COPIES, 3, "cd" * 32, spec))
    assert not np.array_equal(ours[..., 2], ours[..., 1])


@pytest.mark.parametrize("decode", ["exact", "fast"])
def test_extract_writes_the_cache_of_the_three_channel_path(small_xrays, extract_config, tmp_path, monkeypatch, decode):
    """The same cache file name (fingerprint) and the same datasets as extract with the previous decode and
    augmentation (tiny backbone, 64 px: ``--decode fast`` decodes the dev images at 1/2)."""
    from featcache import compute
    from featcache.extract import extract_features
    from tests.conftest import read_datasets

    (now,) = extract_features(extract_config(small_xrays, cache_dir=tmp_path / "now", decode=decode))

    def old_load_image(path, image_size, max_pixels=None, scaled=False):
        return old_decode_and_resize(path.read_bytes(), image_size, scaled)

    monkeypatch.setattr(compute, "load_image", old_load_image)
    monkeypatch.setattr(compute, "augment_copies", old_augment_copies)
    (before,) = extract_features(extract_config(small_xrays, cache_dir=tmp_path / "before", decode=decode))
    assert now.cache_path.name == before.cache_path.name
    ours, theirs = read_datasets(now.cache_path), read_datasets(before.cache_path)
    assert ours.keys() == theirs.keys() and {"features", "pooled", "copy_index"} <= ours.keys()
    assert ours["copy_index"].max() == 2  # augmented copies were compared too
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
