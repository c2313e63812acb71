"""Image folders: find images and labels, assign a stable patient-grouped split, decode and resize.
(Label files: ``labels`` and ``labelset``; patient ids: ``patients``; DICOM pixels: ``dicom``.)

Decoding and resizing are TensorFlow ops (``decode_and_resize``) so that extraction and the
exported serving signature run the very same definition.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import re
import stat
import sys
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featcache.dicom import PREAMBLE_END, dicom_patient_id, dicom_to_gray, is_dicom_bytes, is_dicom_file
from featcache.errors import DamagedFileError, DataError, ImageTooLargeError, storage_error
from featcache.integrity import load_json, source_name
from featcache.patients import PATIENT_PATTERN, assign_patients, patient_id  # noqa: F401 - patient_id re-exported

if TYPE_CHECKING:
    from featcache.labels import LabelFile

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".dcm")
SPLITS = ("train", "val", "test")
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
VAL_FRACTION = 0.2
REGISTRY_SPLITS = ("train", "val")  # test/ stays test: the registry holds only the pooled train/val patients

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


@dataclass(frozen=True)
class ImageRecord:
    """One image file: ``path`` relative to the data folder (POSIX), class ``label``, ``split``."""

    path: str
    label: int
    split: str
    patient: str


@dataclass(frozen=True)
class ImageFolder:
    """The images of a data set. ``patient_rules``: rules beyond the Kermany name rule that decided some
    patient id; ``dicom``: some file is DICOM; ``labels``: the label file they came from, or None (class
    folders); ``left_out``: label-file rows without a certain label ({"path", "line", "reason"})."""

    root: Path
    class_names: tuple[str, ...]
    records: tuple[ImageRecord, ...]
    skipped: tuple[dict, ...] = ()  # {"path", "error"} of entries that look like images but cannot be used
    patient_rules: tuple[str, ...] = ()
    dicom: bool = False
    labels: "LabelFile | None" = None
    left_out: tuple[dict, ...] = ()


def split_patients(patients: dict[str, tuple[int, int]], seed: int, val_fraction: float = VAL_FRACTION,
                   previous: dict[str, str] | None = None) -> dict[str, str]:
    """Assign each patient to 'train' or 'val', stratified by class and stable under additions.

    Args:
        patients: patient id -> (label, number of images) of the pooled train/val images.
        seed: orders the patients (by a hash of seed and id), so the split is reproducible.
        val_fraction: target share of each class's images in validation.
        previous: assignments made earlier; they are kept as they are.

    Returns:
        patient id -> split, for every patient given.

    Patients new to ``previous`` are visited in hash order; each goes to validation while that
    keeps its class closest to ``val_fraction`` of its images, else to train. So a fresh split is
    stratified to within one patient, and adding images later never moves existing ones.
    """
    previous = previous or {}
    assigned = {p: previous[p] for p in patients if p in previous}
    for label in sorted({label for label, _ in patients.values()}):
        members = {p: n for p, (lab, n) in patients.items() if lab == label}
        target = val_fraction * sum(members.values())
        in_val = sum(n for p, n in members.items() if assigned.get(p) == "val")
        for patient in sorted((p for p in members if p not in assigned), key=lambda p: _split_hash(p, seed)):
            n = members[patient]
            if abs(in_val + n - target) < abs(in_val - target):
                assigned[patient], in_val = "val", in_val + n
            else:
                assigned[patient] = "train"
    return assigned


def _split_hash(patient: str, seed: int) -> bytes:
    return hashlib.sha256(f"featcache-split:{seed}:{patient}".encode()).digest()


def find_images(data_dir: str | Path, seed: int, val_fraction: float = VAL_FRACTION,
                previous_split: dict[str, str] | None = None, patient_pattern: str | None = None) -> ImageFolder:
    """Scan a Kermany-layout folder: ``train/``, optional ``val/``, ``test/``, one folder per class.

    ``train`` and ``val`` are pooled and re-split by patient with ``split_patients`` (keeping the
    assignments in ``previous_split``); ``test`` stays test. Patient ids: ``patients.assign_patients``.

    Raises:
        DataError: a missing or empty folder, a missing ``test`` or class folder, fewer than two classes.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"Data folder {root} does not exist. Received: data={str(data_dir)!r}")
    for required in ("train", "test"):
        if not (root / required).is_dir():
            raise DataError(
                f"Data folder {root} has no {required}/ folder; expected {root}/train/<class>/ and {root}/test/<class>/."
            )
    class_names = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith(".")))
    if len(class_names) < 2:
        raise DataError(
            f"{root}/train needs at least two class folders (e.g. NORMAL, PNEUMONIA). Received: {list(class_names)}"
        )
    found: list[tuple[str, int, str]] = []  # (relative path, label, folder)
    skipped: list[dict] = []  # entries that look like images but cannot be used
    for folder in ("train", "val", "test"):
        if not (root / folder).is_dir():
            continue
        present = {p.name for p in (root / folder).iterdir() if p.is_dir()}
        if folder == "test" and set(class_names) - present:
            missing = sorted(set(class_names) - present)
            raise DataError(f"{root}/test has no folder for class {', '.join(missing)}; expected {list(class_names)}.")
        for label, name in enumerate(class_names):
            files, unusable = _list_images(root / folder / name, root)
            skipped += unusable
            if folder != "val" and not files:
                raise DataError(f"Class folder {root / folder / name} holds no JPEG, PNG or DICOM images.")
            found += [(path, label, folder) for path in files]
    paths = [path for path, _, _ in found]
    dicom_ids, has_dicom = dicom_patient_ids(root, paths)
    patients, rules = assign_patients(paths, patient_pattern, dicom_ids, layout_depth=2)
    pool: dict[str, list[int]] = {}
    for path, label, folder in found:
        if folder != "test":
            pool.setdefault(patients[path], []).append(label)
    majority = {p: (labels[0], 1) if len(labels) == 1 else (max(set(labels), key=labels.count), len(labels))
                for p, labels in pool.items()}
    splits = split_patients(majority, seed, val_fraction, previous_split)
    found.sort(key=itemgetter(0))  # the records in path order (paths are unique: a stable sort is the same)
    records = [ImageRecord(path, label, "test" if folder == "test" else splits[patients[path]], patients[path])
               for path, label, folder in found]
    check_patients_disjoint(records)
    return ImageFolder(root, class_names, tuple(records), tuple(sorted(skipped, key=lambda s: s["path"])),
                       tuple(rules), has_dicom)


def dicom_patient_ids(root: Path, paths: list[str], sniff: bool = False) -> tuple[dict[str, str], bool]:
    """(path -> PatientID of the DICOM files among ``paths`` that carry one, whether any file is DICOM);
    headers only. ``sniff`` also opens files without a ``.dcm`` name (their first 132 bytes) to look for
    the DICOM preamble."""
    ids: dict[str, str] = {}
    found = False
    for path in paths:
        if path.lower().endswith(".dcm") or (sniff and is_dicom_file(root / path)):
            found = True
            patient = dicom_patient_id(root / path)
            if patient:
                ids[path] = patient
    return ids, found


def _list_images(folder: Path, root: Path) -> tuple[list[str], list[dict]]:
    """Regular JPEG/PNG files under ``folder`` (hidden names ignored) as paths relative to ``root`` (POSIX,
    in ``Path`` order), and the entries that look like images but cannot be used, each with a reason
    (``{"path", "error"}``, path relative to ``root``).

    Symbolic links to regular image files are followed (inside or outside the tree); links to folders
    are not followed, and dangling or looping links, FIFOs, sockets and devices are reported, never
    opened. A name that is not valid UTF-8 cannot be stored in the cache and is reported too.
    Plain strings and the folder entries' own types (no ``stat`` for a regular file): ~100k files a second.
    """
    files: list[str] = []
    skipped: list[dict] = []
    if not folder.is_dir():
        return files, skipped
    pending = [(str(folder), folder.relative_to(root).as_posix())]
    encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    while pending:
        current, prefix = pending.pop()
        try:
            with os.scandir(current) as scan:
                entries = sorted(scan, key=lambda e: e.name.encode(encoding, errors))  # os.fsencode, inlined
        except OSError as exc:
            skipped.append({"path": printable_path(prefix), "error": f"cannot read folder: {exc.strerror}"})
            continue
        for entry in entries:
            name = entry.name
            if entry.is_dir(follow_symlinks=False):
                pending.append((entry.path, f"{prefix}/{name}"))  # hidden folders too, as rglob did
                continue
            if name.startswith("."):
                continue
            relative = f"{prefix}/{name}"
            is_link = entry.is_symlink()
            regular = not is_link and entry.is_file(follow_symlinks=False)
            error = None if regular else _entry_problem(Path(entry.path), is_link)
            if error is None and not relative.isascii() and printable_path(relative) != relative:
                error = "file name is not valid UTF-8; rename it"
            image = _suffix(name).lower() in IMAGE_EXTENSIONS
            if error is None and image:
                files.append(relative)
            elif error and (image or is_link):
                skipped.append({"path": printable_path(relative), "error": error})
    return sorted(files, key=lambda path: path.split("/")), skipped


def _suffix(name: str) -> str:
    """``PurePath(name).suffix``: the last ``.xxx`` of a name, '' for none (a leading dot is no suffix)."""
    at = name.rfind(".")
    return name[at:] if 0 < at < len(name) - 1 else ""


def _entry_problem(path: Path, is_link: bool) -> str | None:
    """Why a folder entry cannot be read as an image file, or None (``stat`` only: never opens it)."""
    try:
        info = path.stat()  # follows links
    except OSError as exc:
        if not is_link:
            return f"cannot read: {exc.strerror}"
        return "symbolic link loop" if exc.errno == errno.ELOOP else f"dangling symbolic link ({exc.strerror})"
    if stat.S_ISDIR(info.st_mode):
        return "symbolic link to a folder (not followed)"
    if not stat.S_ISREG(info.st_mode):
        kind = "FIFO" if stat.S_ISFIFO(info.st_mode) else "socket" if stat.S_ISSOCK(info.st_mode) else "device"
        return f"not a regular file ({kind}{', via a symbolic link' if is_link else ''})"
    return None


def printable_path(path: str) -> str:
    """A path as text that can be stored and printed: bytes of a non-UTF-8 name become ``\\xNN``."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_patients_disjoint(records: list[ImageRecord]) -> None:
    """A patient found in test and in train/val would leak; warn, since the folders are the user's."""
    test = {r.patient for r in records if r.split == "test"}
    shared = sorted({r.patient for r in records if r.split != "test"} & test)
    if shared:
        log.warning("%d patient ids appear in both test/ and train/val/ (e.g. %s)", len(shared), shared[0])


def split_registry_path(cache_dir: str | Path, seed: int) -> Path:
    return Path(cache_dir) / f"split-seed{seed}.json"


def read_split_registry(cache_dir: str | Path, seed: int) -> dict[str, str]:
    """Patient -> 'train'|'val' assignments made by earlier runs in this cache folder (shared by backbones).

    Raises:
        DamagedFileError: not featcache's split file, another seed, or a value other than 'train'/'val'
            (an edit that would silently move images between splits, e.g. a train patient into test).
    """
    path = split_registry_path(cache_dir, seed)
    if not os.path.lexists(path):
        return {}
    fix = "move it away and re-run 'featcache extract' (the split is recomputed from the seed)."
    record = load_json(path, {"seed": int, "patients": dict}, fix)
    patients = record["patients"]
    wrong = next(((p, v) for p, v in patients.items() if v not in REGISTRY_SPLITS or not p), None)
    if wrong is not None or record["seed"] != seed:
        problem = (f"seed {record['seed']} instead of {seed}" if wrong is None else
                   f"patient {wrong[0]!r} is assigned {wrong[1]!r}; only 'train' and 'val' are allowed")
        raise DamagedFileError(f"{path} is not a valid split file: {problem}; {fix} Received: {source_name(path)}")
    return patients


def write_split_registry(cache_dir: str | Path, seed: int, patients: dict[str, str]) -> None:
    path = split_registry_path(cache_dir, seed)
    tmp = path.with_name(path.name + ".incomplete")
    try:
        tmp.write_text(json.dumps({"seed": seed, "patients": dict(sorted(patients.items()))}, indent=0))
    except OSError as exc:  # a failed write does not name its file
        raise storage_error(exc, tmp) from None
    os.replace(tmp, path)


def hash_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's content, read in 1 MiB blocks (images, heads, exported models)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


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
