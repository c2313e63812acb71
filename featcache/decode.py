"""Image bytes -> (s, s, 3) uint8 square pixels: the one definition that extract, evaluate, predict and the
exported SavedModel share. Decoding and resizing are TensorFlow ops (``decode_and_resize``) so that extraction
and the exported serving signature run the very same definition.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from featcache.dicom import PREAMBLE_END, dicom_to_gray, is_dicom_bytes
from featcache.errors import DataError, ImageTooLargeError

# Bump when decode_and_resize gives other pixels: RESIZE is hashed into every cache fingerprint, so a
# cache decoded another way gets another file and is never mixed with this one. 1: tf.io.decode_image
# (TensorFlow's fast JPEG IDCT); 2: libjpeg's accurate IDCT, pixel for pixel what Pillow (and so Keras's
# load_img / flow_from_directory) gives.
DECODE_VERSION = 2

# What decode_and_resize does, recorded in every cache manifest (and hashed into the fingerprint). Gray files
# now go through in one channel (decode_pixels), which gives exactly these pixels, so the text and the
# fingerprints stay as they were (tests/test_one_channel.py).
RESIZE = {
    "decode_version": DECODE_VERSION,
    "decode": "JPEG: tf.io.decode_jpeg(channels=3, dct_method='INTEGER_ACCURATE'); "
              "PNG: tf.io.decode_png(channels=3, dtype=uint8); other formats refused",
    "method": "bilinear",
    "antialias": True,
    "aspect": "stretched to a square",
    "output": "uint8, rounded",
}

# --decode fast: JPEGs are decoded at a reduced scale inside libjpeg's inverse DCT (tf.io.decode_jpeg's
# ``ratio``: 1/2, 1/4 or 1/8), the largest that keeps the shorter side at least JPEG_SCALE_MARGIN times the
# target size, then resized as above. A full-resolution X-ray (1,000-2,500 px) to 224 px decodes at 1/2 or 1/4,
# several times faster; pixels move by about one level (measured in BENCHMARKS.md). Not the default: the exact
# decode is pixel for pixel the reference's (Pillow). Recorded in the manifest, hence in the fingerprint.
JPEG_SCALE_MARGIN = 2
JPEG_RATIOS = (1, 2, 4, 8)
DECODES = ("exact", "fast")
FAST_DECODE = {"jpeg_scaling": f"tf.io.decode_jpeg(ratio=r), r the largest of {JPEG_RATIOS} with "
                               f"min(height, width) / r >= {JPEG_SCALE_MARGIN} x image size"}


def resize_settings(decode: str = "exact") -> dict:
    """What ``decode_and_resize`` does with ``--decode``, as recorded in a cache manifest (``resize``)."""
    return dict(RESIZE) if decode == "exact" else {**RESIZE, **FAST_DECODE}


def scaled_decode(resize: dict | None) -> bool:
    """Whether a cache (its manifest's ``resize``) or a model card was made with ``--decode fast``."""
    return bool(resize and "jpeg_scaling" in resize)


# Largest image decoded, in pixels (width x height), read from the file header before decoding. Pillow's
# MAX_IMAGE_PIXELS: 1 GiB / (3 channels x 4 bytes), so the float32 RGB image the resize works on stays
# under 1 GiB; a 23,000 x 23,000 PNG of 560 KB (a decompression bomb) is 6 times that.
MAX_PIXELS = 89_478_485
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode_and_resize(encoded, image_size: int, max_pixels: int = MAX_PIXELS, scaled: bool = False):
    """Encoded JPEG/PNG bytes (a scalar tf.string) -> (s, s, 3) uint8 RGB.

    JPEG is decoded with libjpeg's accurate integer IDCT (equal to Pillow's pixels); gray is repeated to
    three channels, alpha is dropped, palette is expanded, CMYK is converted and 16-bit keeps its high
    byte; then a bilinear, antialiased resize to a square. The exported model's serving signature calls
    this same function, so it is graph-only TensorFlow. With ``scaled`` (``--decode fast``) a JPEG is decoded at
    a reduced DCT scale first (``FAST_DECODE``).

    A gray file (a one-component JPEG, a gray PNG: every chest X-ray) is decoded, resized and rounded in one
    channel and repeated to three at the end: the same pixels as decoding to RGB first (libjpeg and libpng
    only repeat the gray value, and the resize works channel by channel), at a third of the resize cost.

    Raises (when run):
        tf.errors.InvalidArgumentError: not a JPEG or PNG, a broken file, or more than ``max_pixels``
            pixels by its header (checked before decoding).
    """
    import tensorflow as tf

    min_side = JPEG_SCALE_MARGIN * image_size if scaled else None
    image = resize_square(decode_pixels(encoded, max_pixels, min_side), image_size)
    rgb = tf.tile(image, [1, 1, 3 // tf.shape(image)[-1]])  # gray (1 channel) -> 3 equal channels; RGB as is
    rgb.set_shape((image_size, image_size, 3))
    return rgb


def resize_square(image, image_size: int):
    """(h, w, c) uint8 -> (s, s, c) uint8: bilinear, antialiased, rounded; the resize of every input kind.
    Each channel is resized on its own, so one gray channel gives what each of three equal channels gives."""
    import tensorflow as tf

    image = tf.image.resize(image, (image_size, image_size), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def decode_rgb(encoded, max_pixels: int = MAX_PIXELS, min_side: int | None = None):
    """Encoded JPEG/PNG bytes (a scalar tf.string) -> (h, w, 3) uint8 RGB at the file's own size
    (``decode_pixels`` with gray repeated to three channels)."""
    import tensorflow as tf

    image = decode_pixels(encoded, max_pixels, min_side)
    rgb = tf.tile(image, [1, 1, 3 // tf.shape(image)[-1]])
    rgb.set_shape((None, None, 3))
    return rgb


def decode_pixels(encoded, max_pixels: int = MAX_PIXELS, min_side: int | None = None):
    """Encoded JPEG/PNG bytes (a scalar tf.string) -> (h, w, c) uint8 at the file's own size: c = 1 for a gray
    file (a one-component JPEG; a gray or gray-and-alpha PNG), else c = 3, RGB.

    Repeating the gray channel three times gives exactly what ``decode_jpeg``/``decode_png`` with
    ``channels=3`` give (tests/test_one_channel.py checks it on every dev image and every kind of file).

    The pixel count is read from the header and checked against ``max_pixels`` before anything is
    decoded, so a decompression bomb costs a few bytes of reading, not gigabytes. With ``min_side`` a JPEG
    is decoded at the smallest DCT scale (``JPEG_RATIOS``) whose shorter side is still ``min_side`` or more.
    """
    import tensorflow as tf

    height, width = encoded_image_size(encoded)
    message = tf.strings.format("Image of {} x {} pixels is over the limit of {} pixels",
                                (width, height, tf.constant(max_pixels, tf.int64)))
    fits = tf.debugging.Assert(height * width <= max_pixels, [message])
    with tf.control_dependencies([fits]):
        image = tf.cond(
            tf.io.is_jpeg(encoded),
            lambda: _decode_jpeg(encoded, tf.minimum(height, width), min_side),
            lambda: _decode_png(encoded),
        )
    image.set_shape((None, None, None))
    return image


def _decode_png(encoded):
    """PNG as it is stored: gray (with or without alpha) -> 1 channel; RGB, RGBA, palette -> 3 (alpha dropped)."""
    import tensorflow as tf

    image = tf.io.decode_png(encoded, channels=0, dtype=tf.uint8)
    return tf.cond(tf.shape(image)[-1] <= 2, lambda: image[:, :, :1], lambda: image[:, :, :3])


def _decode_jpeg(encoded, shorter, min_side: int | None):
    """libjpeg's accurate IDCT, at full size or (``min_side``) at the largest ratio that keeps ``shorter``/ratio
    at least ``min_side``: ``ratio`` is a static attribute, so one branch per ratio. ``channels=0``: a
    one-component (gray) JPEG gives 1 channel, every other kind 3 (RGB, CMYK converted), as ``channels=3``."""
    import tensorflow as tf

    def at(ratio):
        return lambda: tf.io.decode_jpeg(encoded, channels=0, dct_method="INTEGER_ACCURATE", ratio=ratio)

    if min_side is None:
        return at(1)()
    fits = tf.stack([shorter // ratio >= min_side for ratio in JPEG_RATIOS])
    index = tf.reduce_max(tf.where(fits, tf.range(len(JPEG_RATIOS)), 0))
    return tf.switch_case(tf.cast(index, tf.int32), [at(ratio) for ratio in JPEG_RATIOS])


def encoded_image_size(encoded):
    """(height, width) int64 scalars of encoded JPEG/PNG bytes, from the header alone.

    JPEG: ``tf.image.extract_jpeg_shape`` (libjpeg reads the markers up to the frame header). PNG: the
    IHDR chunk, which the format requires first: width and height are bytes 16..24, big-endian.

    Raises (when run):
        tf.errors.InvalidArgumentError: neither JPEG nor PNG, or an unreadable JPEG header.
    """
    import tensorflow as tf

    is_jpeg = tf.io.is_jpeg(encoded)
    is_png = tf.equal(tf.strings.substr(encoded, 0, len(PNG_SIGNATURE)), PNG_SIGNATURE)
    known = tf.debugging.Assert(is_jpeg | is_png, ["Unknown image file format; featcache reads JPEG and PNG files"])

    def jpeg_size():
        shape = tf.image.extract_jpeg_shape(encoded, output_type=tf.int64)
        return shape[0], shape[1]

    def png_size():
        padded = tf.strings.join([encoded, b"\0" * 24])  # a truncated file reads as 0 x 0; decode_png rejects it
        ihdr = tf.cast(tf.io.decode_raw(tf.strings.substr(padded, 16, 8), tf.uint8), tf.int64)
        width = ((ihdr[0] * 256 + ihdr[1]) * 256 + ihdr[2]) * 256 + ihdr[3]
        height = ((ihdr[4] * 256 + ihdr[5]) * 256 + ihdr[6]) * 256 + ihdr[7]
        return height, width

    with tf.control_dependencies([known]):
        return tf.cond(is_jpeg, jpeg_size, png_size)


def load_image(path: str | Path, image_size: int, max_pixels: int = MAX_PIXELS, scaled: bool = False) -> np.ndarray:
    """Read and decode one image file to (s, s, 3) uint8.

    Raises:
        ImageTooLargeError: more than ``max_pixels`` pixels (nothing was decoded).
        DataError: the file cannot be read or is not a decodable image.
    """
    try:
        encoded = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"Cannot read {path}: {exc.strerror}") from exc
    return decode_bytes(encoded, image_size, name=str(path), max_pixels=max_pixels, scaled=scaled)


def decode_bytes(encoded: bytes, image_size: int, name: str = "image", max_pixels: int = MAX_PIXELS,
                 scaled: bool = False) -> np.ndarray:
    """Decode encoded JPEG/PNG bytes to (s, s, 3) uint8 with ``decode_and_resize``; DICOM bytes (the
    preamble, or a ``.dcm`` name) through ``dicom.dicom_to_gray`` and the same ``resize_square``.

    Raises:
        ImageTooLargeError: more than ``max_pixels`` pixels by the header (nothing was decoded).
        DataError: empty input or not a decodable image.
    """
    import tensorflow as tf

    if not encoded:
        raise DataError(f"{name} is empty (0 bytes)")
    if is_dicom_bytes(encoded[:PREAMBLE_END]) or (name.lower().endswith(".dcm") and not _looks_jpeg_or_png(encoded)):
        pixels = dicom_to_gray(encoded, name, max_pixels)
        return _compiled_resize(image_size)(tf.constant(pixels)).numpy()
    tensor = tf.constant(encoded)
    try:
        height, width = (int(v) for v in _compiled_size()(tensor))
        if height * width > max_pixels:
            raise ImageTooLargeError(
                f"{name} is {width} x {height} = {height * width:,} pixels, over the limit of {max_pixels:,} "
                f"(raise it with --max-pixels)", pixels=height * width)
        return _compiled_decoder(image_size, max_pixels, scaled)(tensor).numpy()
    except tf.errors.InvalidArgumentError as exc:
        raise DataError(f"{name} is not a readable image: {_decoder_message(exc.message)}") from None


def _looks_jpeg_or_png(encoded: bytes) -> bool:
    """JPEG (FF D8 FF) or PNG magic: a ``.dcm`` name on such bytes is a misnamed image, decoded as one."""
    return encoded[:3] == b"\xff\xd8\xff" or encoded[:len(PNG_SIGNATURE)] == PNG_SIGNATURE


def _decoder_message(message: str) -> str:
    """The decoder's own words in a TensorFlow error: the line before ``[[{{node ...}}]]``."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    at = next((i for i, line in enumerate(lines) if line.startswith("[[")), len(lines))
    line = lines[at - 1] if at > 0 else message.strip()
    line = re.sub(r"^\{\{[^}]*\}\}\s*", "", line).split(" [Op:")[0].strip()
    return re.sub(r"^assertion failed: \[(.*)\]$", r"\1", line)


@functools.lru_cache(maxsize=None)
def _compiled_size():
    """``encoded_image_size`` as a tf.function: the header check of ``decode_bytes``."""
    import tensorflow as tf

    return tf.function(encoded_image_size, input_signature=[tf.TensorSpec([], tf.string)], autograph=False)


@functools.lru_cache(maxsize=None)
def _compiled_resize(image_size: int):
    """``resize_square`` as a tf.function, for pixels decoded outside TensorFlow (DICOM)."""
    import tensorflow as tf

    def resize(image):
        square = resize_square(image, image_size)
        return tf.tile(square, [1, 1, 3 // tf.shape(square)[-1]])  # gray (1 channel) -> 3, as decode_and_resize

    return tf.function(resize, input_signature=[tf.TensorSpec([None, None, None], tf.uint8)], autograph=False)


@functools.lru_cache(maxsize=None)
def _compiled_decoder(image_size: int, max_pixels: int = MAX_PIXELS, scaled: bool = False):
    """``decode_and_resize`` as a tf.function: a third of the eager per-image cost."""
    import tensorflow as tf

    def decode(encoded):
        return decode_and_resize(encoded, image_size, max_pixels, scaled)

    return tf.function(decode, input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
