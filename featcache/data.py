"""Image folders: find images and labels, assign a stable patient-grouped split.
(Label files: ``labels`` and ``labelset``; patient ids: ``patients``; DICOM pixels: ``dicom``; decoding and
resizing the pixels: ``decode``.)
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import sys
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING

from featcache.dicom import dicom_patient_id, is_dicom_file
from featcache.errors import DamagedFileError, DataError, storage_error
from featcache.integrity import load_json, source_name
from featcache.patients import assign_patients

if TYPE_CHECKING:
    from featcache.labels import LabelFile

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".dcm")
SPLITS = ("train", "val", "test")
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
VAL_FRACTION = 0.2
REGISTRY_SPLITS = ("train", "val")  # test/ stays test: the registry holds only the pooled train/val patients


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
