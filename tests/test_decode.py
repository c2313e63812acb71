"""``decode.decode_and_resize`` and its helpers: the same pixels as Pillow (what Keras's ``load_img`` and the
reference's ``flow_from_directory`` read), hostile images, the decode version in the fingerprint."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from featcache.decode import RESIZE, decode_bytes, decode_rgb

# What decode.RESIZE said before the accurate JPEG decode (featcache 0.1.0, decode version 1).
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
    """The real fingerprint builder: a cache of the old decode (or of --decode fast) gets another fingerprint, so
    another file."""
    from dataclasses import replace

    from featcache import decode, extract
    from featcache.backbones import get_backbone_spec
    from featcache.cache import compute_fingerprint

    config, spec = extract_config(small_xrays), get_backbone_spec("tiny")
    new = compute_fingerprint(extract._feature_settings(config, spec, "0" * 64, "float32"))
    fast = compute_fingerprint(extract._feature_settings(replace(config, decode="fast"), spec, "0" * 64, "float32"))
    monkeypatch.setattr(decode, "RESIZE", OLD_RESIZE)
    old = compute_fingerprint(extract._feature_settings(config, spec, "0" * 64, "float32"))
    monkeypatch.setattr(decode, "RESIZE", {**RESIZE, "decode_version": RESIZE["decode_version"] + 1})
    bumped = compute_fingerprint(extract._feature_settings(config, spec, "0" * 64, "float32"))
    assert len({new, fast, old, bumped}) == 4


def test_an_old_decode_cache_is_not_reused_and_not_assembled(extract_config, small_xrays, monkeypatch):
    from featcache import decode, extract
    from featcache.assemble import check_decoding
    from featcache.cache import read_manifest
    from featcache.errors import CacheMismatchError

    with monkeypatch.context() as patch:
        patch.setattr(decode, "RESIZE", OLD_RESIZE)
        (old,) = extract.extract_features(extract_config(small_xrays, augment_copies=0))
    (new,) = extract.extract_features(extract_config(small_xrays, augment_copies=0))
    assert new.cache_path != old.cache_path and old.cache_path.is_file()
    assert new.reused_rows == 0 and new.computed_rows == new.counts["rows"]
    assert read_manifest(new.cache_path)["resize"] == RESIZE
    check_decoding(new.cache_path, read_manifest(new.cache_path))
    with pytest.raises(CacheMismatchError, match="decoding version 1.*re-run 'featcache extract'"):
        check_decoding(old.cache_path, read_manifest(old.cache_path))


# --- the pixel limit --------------------------------------------------------------------------


def png_bomb(width: int = 23_000, height: int = 23_000) -> bytes:
    """A valid 1-bit gray PNG of zeros, written chunk by chunk: 23,000 x 23,000 is 64 KB on disk and
    529 million pixels (1.6 GB as 8-bit RGB) decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows, compressor = b"\0" * (1 + (width + 7) // 8) * 1000, zlib.compressobj(9)  # filter byte + packed row
    idat = b"".join(compressor.compress(rows[:len(rows) // 1000 * min(1000, height - done)])
                    for done in range(0, height, 1000)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, gray, deflate, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def gray_png(width: int, height: int) -> bytes:
    return encode(Image.fromarray(np.full((height, width), 90, np.uint8)), "PNG")


def test_a_decompression_bomb_is_refused_from_its_header():
    from featcache.decode import MAX_PIXELS
    from featcache.errors import ImageTooLargeError

    bomb = png_bomb()
    assert len(bomb) < 600_000 and __import__("struct").unpack(">II", bomb[16:24]) == (23_000, 23_000)
    small = Image.open(io.BytesIO(png_bomb(50, 2100)))  # the writer makes valid PNGs (Pillow refuses the big one)
    assert small.size == (50, 2100) and not np.asarray(small).any()
    with pytest.raises(ImageTooLargeError, match="bomb.png is 23000 x 23000 = 529,000,000 pixels, over the limit of "
                                                 "89,478,485") as info:
        decode_bytes(bomb, 32, name="bomb.png")
    assert info.value.pixels == 23_000 * 23_000 and MAX_PIXELS == 89_478_485
    # the graph itself refuses it too (the SavedModel's serving function has no host-side check)
    with pytest.raises(tf.errors.InvalidArgumentError, match="Image of 23000 x 23000 pixels is over the limit"):
        tf.function(decode_rgb, autograph=False)(tf.constant(bomb))


def test_a_jpeg_header_claiming_60000_x_60000_is_refused_before_decoding():
    from featcache.errors import ImageTooLargeError

    encoded = bytearray(encode(Image.fromarray(_gradient(16, 16)), "JPEG"))
    sof = encoded.index(b"\xff\xc0")  # baseline frame header: marker, length, precision, height, width
    encoded[sof + 5:sof + 9] = (60_000).to_bytes(2, "big") * 2
    with pytest.raises(ImageTooLargeError, match="60000 x 60000 = 3,600,000,000 pixels"):
        decode_bytes(bytes(encoded), 32)


def test_the_limit_is_inclusive_and_overridable():
    from featcache.errors import ImageTooLargeError

    encoded = gray_png(300, 200)
    assert decode_bytes(encoded, 32, max_pixels=60_000).shape == (32, 32, 3)
    with pytest.raises(ImageTooLargeError, match="300 x 200 = 60,000 pixels, over the limit of 59,999"):
        decode_bytes(encoded, 32, max_pixels=59_999)


def test_header_sizes_agree_with_pillow(dev_data):
    from featcache.decode import encoded_image_size

    samples = [f.read_bytes() for f in sorted(dev_data.rglob("*.jpeg"))[::40]] + list(HOSTILE.values())
    samples += [gray_png(3, 5), png_bomb(70_001, 3)]
    for encoded in samples:
        height, width = (int(v) for v in encoded_image_size(tf.constant(encoded)))
        assert (width, height) == Image.open(io.BytesIO(encoded)).size


def test_extract_skips_and_records_images_over_the_limit_and_retries_them_when_raised(small_xrays, extract_config):
    from featcache.cache import read_manifest
    from featcache.extract import extract_features

    folder = small_xrays / "train" / "PNEUMONIA"
    (folder / "bomb.png").write_bytes(png_bomb())
    (folder / "big.png").write_bytes(gray_png(1000, 1000))  # dev X-rays have at most 260,608 pixels
    (first,) = extract_features(extract_config(small_xrays, max_pixels=500_000))
    skipped = {s["path"]: s for s in read_manifest(first.cache_path)["skipped"]}
    assert set(skipped) == {"train/PNEUMONIA/bomb.png", "train/PNEUMONIA/big.png"}
    assert skipped["train/PNEUMONIA/big.png"]["pixels"] == 1_000_000
    assert "over the limit of 500,000" in skipped["train/PNEUMONIA/bomb.png"]["error"]
    (again,) = extract_features(extract_config(small_xrays, max_pixels=500_000))
    assert again.computed_rows == 0 and len(again.skipped) == 2
    (raised,) = extract_features(extract_config(small_xrays))  # the default limit admits big.png
    assert raised.cache_path == first.cache_path and raised.computed_rows >= 1
    assert [s["path"] for s in read_manifest(raised.cache_path)["skipped"]] == ["train/PNEUMONIA/bomb.png"]


def test_max_pixels_must_be_positive(tmp_path):
    from featcache.config import EvaluateConfig, ExtractConfig
    from featcache.errors import FeatcacheError

    for make in (lambda: ExtractConfig(data_dir=tmp_path, max_pixels=0), lambda: EvaluateConfig(max_pixels=-1)):
        with pytest.raises(FeatcacheError, match="--max-pixels must be >= 1. Received: max_pixels="):
            make()


@pytest.fixture(scope="module")
def run(tmp_path_factory, dev_data):
    from pipeline import dev_pipeline

    return dev_pipeline(tmp_path_factory, dev_data)


def test_evaluate_skips_test_images_over_the_limit(run, tmp_path):
    from pipeline import copy_run, run_cli

    copy = copy_run(run, tmp_path)
    sizes = {f.relative_to(run["data"]).as_posix(): Image.open(f).size for f in (run["data"] / "test").rglob("*.jpeg")}
    limit = sorted(w * h for w, h in sizes.values())[len(sizes) // 2]
    result = run_cli("evaluate", "--no-progress", "--cache-dir", copy["cache_dir"], "--bootstrap", "20", "--max-pixels", limit)
    assert result.exit_code == 0, result.output
    report = __import__("json").loads((copy["run_dir"] / "report.json").read_text())
    over = {p for p, (w, h) in sizes.items() if w * h > limit}
    assert {s["path"] for s in report["test"]["skipped"]} == over and len(over) >= 10
    assert all("over the limit" in s["error"] for s in report["test"]["skipped"])
    assert set(report["predictions"]["path"]) == set(sizes) - over


def test_predict_skips_a_bomb_and_the_saved_model_refuses_it(run, tmp_path):
    from pipeline import run_cli

    good = sorted((run["data"] / "test" / "NORMAL").iterdir())[0]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bomb.png").write_bytes(png_bomb())
    (tmp_path / "in" / good.name).write_bytes(good.read_bytes())
    result = run_cli("predict", "--no-progress", tmp_path / "in", "--model", run["model"], "--json")
    assert result.exit_code == 2, result.output
    out = __import__("json").loads(result.stdout)
    assert [p["path"].rsplit("/", 1)[-1] for p in out["predictions"]] == [good.name]
    (skip,) = out["skipped"]
    assert skip["path"].endswith("bomb.png") and "23000 x 23000 = 529,000,000 pixels" in skip["error"]
    card = __import__("json").loads((run["model"] / "model.json").read_text())
    assert card["preprocessing"]["max_pixels"] == 89_478_485  # what the SavedModel refuses, on its card
    serve = tf.saved_model.load(str(run["model"] / "model.export")).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="over the limit of 89478485 pixels"):
        serve(image_bytes=tf.constant([good.read_bytes(), png_bomb()]))


# --- --decode fast: JPEGs decoded at a reduced DCT scale first ------------------------------------------------


def _big_jpeg(dev_data, size: tuple[int, int], index: int = 0) -> bytes:
    source = sorted((dev_data / "train" / "NORMAL").glob("*.jpeg"))[index]
    return encode(Image.open(source).convert("L").resize(size, Image.BICUBIC), "JPEG", quality=92)


def test_fast_decode_picks_the_largest_dct_scale_that_keeps_twice_the_target(dev_data):
    from featcache.decode import resize_square

    encoded = _big_jpeg(dev_data, (1200, 1000))  # shorter side 1000: at 64 px 1/4 keeps 250 >= 128, 1/8 (125) does not
    direct = tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE", ratio=4)
    expected = resize_square(direct, 64).numpy()
    fast, exact = decode_bytes(encoded, 64, scaled=True), decode_bytes(encoded, 64)
    np.testing.assert_array_equal(fast, expected)
    assert not np.array_equal(fast, exact) and np.abs(fast.astype(int) - exact).max() <= 8  # a few levels
    assert np.abs(fast.astype(float) - exact).mean() < 0.5
    small = _big_jpeg(dev_data, (120, 100))  # below twice the target: decoded whole, the exact pixels
    np.testing.assert_array_equal(decode_bytes(small, 64, scaled=True), decode_bytes(small, 64))
    png = encode(Image.open(io.BytesIO(encoded)), "PNG")  # PNG has no DCT: always whole
    np.testing.assert_array_equal(decode_bytes(png, 64, scaled=True), decode_bytes(png, 64))


def test_fast_decode_runs_end_to_end_with_parity_and_its_own_fingerprint(dev_data, tmp_path):
    from tests.pipeline import FAST, run_cli

    data = tmp_path / "big"
    for split, cls, n in (("train", "NORMAL", 6), ("train", "PNEUMONIA", 10), ("test", "NORMAL", 3),
                          ("test", "PNEUMONIA", 3)):
        (data / split / cls).mkdir(parents=True)
        for i, source in enumerate(sorted((dev_data / split / cls).glob("*.jpeg"))[:n]):
            image = Image.open(source).convert("L").resize((700, 600), Image.BICUBIC)
            (data / split / cls / source.name).write_bytes(encode(image, "JPEG", quality=92))
    caches = {}
    for decode in ("exact", "fast"):
        result = run_cli("extract", "--data", data, "--cache-dir", tmp_path / decode, "--decode", decode, *FAST)
        assert result.exit_code == 0, result.output
        caches[decode] = next(p for p in (tmp_path / decode).glob("tiny-*.h5") if not p.name.endswith(".weights.h5"))
    assert caches["exact"].name != caches["fast"].name  # the decode is part of the fingerprint
    cache_dir = tmp_path / "fast"
    assert run_cli("train-head", "--cache-dir", cache_dir, "--trials", "1", "--no-progress").exit_code == 0
    result = run_cli("evaluate", "--cache-dir", cache_dir, "--data", data, "--bootstrap", "50", "--no-progress")
    assert result.exit_code == 0, result.output
    import json

    report = json.loads((cache_dir / "runs" / caches["fast"].stem / "report.json").read_text())
    assert report["parity"]["max_abs_diff"] <= report["parity"]["tolerance"]  # evaluate decoded as extract did
    result = run_cli("export", "--cache-dir", cache_dir, "--out", tmp_path / "model")
    assert result.exit_code == 0, result.output  # its own check: model.keras and the SavedModel agree on files
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    assert "jpeg_scaling" in card["preprocessing"]["decode_and_resize"]
    assert "--decode fast" in (tmp_path / "model" / "MODEL_CARD.md").read_text()
    one = data / "test" / "PNEUMONIA" / sorted(p.name for p in (data / "test" / "PNEUMONIA").iterdir())[0]
    result = run_cli("predict", "--no-progress", "--model", tmp_path / "model", str(one), "--json")
    assert result.exit_code == 0, result.output
    predicted = json.loads(result.stdout)["predictions"][0]["probability"]
    saved = tf.saved_model.load(str(tmp_path / "model" / "model.export")).signatures["serving_default"]
    served = float(saved(image_bytes=tf.constant([one.read_bytes()]))["probability"].numpy()[0])
    assert predicted == pytest.approx(served, abs=1e-5)  # predict's host decode = the SavedModel's in-graph one
