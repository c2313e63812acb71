"""Image folders: find images and labels, assign a stable patient-grouped split, decode and resize.

Decoding and resizing are TensorFlow ops (``decode_and_resize``) so that extraction and the
exported serving signature run the very same definition.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.errors import DamagedFileError, DataError
from featcache.integrity import load_json, source_name

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
SPLITS = ("train", "val", "test")
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
VAL_FRACTION = 0.2
REGISTRY_SPLITS = ("train", "val")  # test/ stays test: the registry holds only the pooled train/val patients

# Kermany file names: person1430_bacteria_3695.jpeg, IM-0115-0001.jpeg, NORMAL2-IM-0373-0001.jpeg.
PATIENT_PATTERN = r"^(person\d+|NORMAL2-IM-\d+|IM-\d+)"

# What decode_and_resize does, recorded in every cache manifest.
RESIZE = {
    "decode": "tf.io.decode_image(channels=3, dtype=uint8)",
    "method": "bilinear",
    "antialias": True,
    "aspect": "stretched to a square",
    "output": "uint8, rounded",
}


@dataclass(frozen=True)
class ImageRecord:
    """One image file: ``path`` relative to the data folder (POSIX), class ``label``, ``split``."""

    path: str
    label: int
    split: str
    patient: str


@dataclass(frozen=True)
class ImageFolder:
    root: Path
    class_names: tuple[str, ...]
    records: tuple[ImageRecord, ...]


def patient_id(filename: str, pattern: str = PATIENT_PATTERN) -> str:
    """The patient a file belongs to: the match of ``pattern``, or the file stem if none."""
    stem = Path(filename).stem
    match = re.match(pattern, stem)
    return match.group(1) if match else stem


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
                previous_split: dict[str, str] | None = None) -> ImageFolder:
    """Scan a Kermany-layout folder: ``train/``, optional ``val/``, ``test/``, one folder per class.

    ``train`` and ``val`` are pooled and re-split by patient with ``split_patients`` (keeping the
    assignments in ``previous_split``); ``test`` stays test.

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
    for folder in ("train", "val", "test"):
        if not (root / folder).is_dir():
            continue
        present = {p.name for p in (root / folder).iterdir() if p.is_dir()}
        if folder == "test" and set(class_names) - present:
            missing = sorted(set(class_names) - present)
            raise DataError(f"{root}/test has no folder for class {', '.join(missing)}; expected {list(class_names)}.")
        for label, name in enumerate(class_names):
            files = _list_images(root / folder / name)
            if folder != "val" and not files:
                raise DataError(f"Class folder {root / folder / name} holds no JPEG or PNG images.")
            found += [(file.relative_to(root).as_posix(), label, folder) for file in files]
    pool: dict[str, list[int]] = {}
    for path, label, folder in found:
        if folder != "test":
            pool.setdefault(patient_id(path), []).append(label)
    majority = {p: (max(set(labels), key=labels.count), len(labels)) for p, labels in pool.items()}
    splits = split_patients(majority, seed, val_fraction, previous_split)
    records = sorted((
        ImageRecord(path, label, "test" if folder == "test" else splits[patient_id(path)], patient_id(path))
        for path, label, folder in found
    ), key=lambda r: r.path)
    _check_patients_disjoint(records)
    return ImageFolder(root, class_names, tuple(records))


def _list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _check_patients_disjoint(records: list[ImageRecord]) -> None:
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
    tmp.write_text(json.dumps({"seed": seed, "patients": dict(sorted(patients.items()))}, indent=0))
    os.replace(tmp, path)


def hash_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's content, read in 1 MiB blocks (images, heads, exported models)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def decode_and_resize(encoded, image_size: int):
    """Encoded JPEG/PNG bytes (a scalar tf.string) -> (s, s, 3) uint8 RGB.

    Gray is repeated to three channels, alpha is dropped, palette is expanded and 16-bit is
    scaled to 8-bit by TensorFlow's decoder; then a bilinear, antialiased resize to a square.
    The exported model's serving signature calls this same function.
    """
    import tensorflow as tf

    image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    image = tf.image.resize(image, (image_size, image_size), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def load_image(path: str | Path, image_size: int) -> np.ndarray:
    """Read and decode one image file to (s, s, 3) uint8.

    Raises:
        DataError: the file cannot be read or is not a decodable image.
    """
    try:
        encoded = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"Cannot read {path}: {exc.strerror}") from exc
    return decode_bytes(encoded, image_size, name=str(path))


def decode_bytes(encoded: bytes, image_size: int, name: str = "image") -> np.ndarray:
    """Decode encoded JPEG/PNG bytes to (s, s, 3) uint8 with ``decode_and_resize``.

    Raises:
        DataError: empty input or not a decodable image.
    """
    import tensorflow as tf

    if not encoded:
        raise DataError(f"{name} is empty (0 bytes)")
    try:
        return _compiled_decoder(image_size)(tf.constant(encoded)).numpy()
    except tf.errors.InvalidArgumentError as exc:
        raise DataError(f"{name} is not a readable image: {_decoder_message(exc.message)}") from None


def _decoder_message(message: str) -> str:
    """The decoder's own words in a TensorFlow error: the line before ``[[{{node ...}}]]``."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    at = next((i for i, line in enumerate(lines) if line.startswith("[[")), len(lines))
    line = lines[at - 1] if at > 0 else message.strip()
    return re.sub(r"^\{\{[^}]*\}\}\s*", "", line).split(" [Op:")[0].strip()


@functools.lru_cache(maxsize=None)
def _compiled_decoder(image_size: int):
    """``decode_and_resize`` as a tf.function: a third of the eager per-image cost."""
    import tensorflow as tf

    def decode(encoded):
        return decode_and_resize(encoded, image_size)

    return tf.function(decode, input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
