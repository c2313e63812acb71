"""A data set described by a label file: its rows -> image records with patient and split.

Split: the row's ``split`` when given; else the split other rows of the same patient give (when they
agree); else the usual patient-grouped train/val split (``data.split_patients``, kept in the split
registry). Test rows come only from the label file's ``split`` column: a label file without test rows is
refused, so ``evaluate`` always has a held-out set the user chose.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from featcache.data import (
    VAL_FRACTION, ImageFolder, ImageRecord, check_patients_disjoint, dicom_patient_ids, split_patients,
)
from featcache.errors import DataError
from featcache.labels import LabelFile
from featcache.patients import assign_patients

log = logging.getLogger(__name__)


def find_labeled_images(data_dir: str | Path, labels: LabelFile, seed: int, val_fraction: float = VAL_FRACTION,
                        previous_split: dict[str, str] | None = None,
                        patient_pattern: str | None = None) -> ImageFolder:
    """The images a validated label file lists, with patients and splits as the module docstring says.

    Raises:
        DataError: no test rows, or a class with no image in train, val or test.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"Data folder {root} does not exist. Received: data={str(data_dir)!r}")
    rows = labels.rows
    if not rows:
        raise DataError(f"No row of {labels.path} has a certain label (--uncertain {labels.uncertain}). "
                        f"Received: rows={len(labels.left_out)}")
    if not any(row.split == "test" for row in rows):
        raise DataError(f"{labels.path} has no row with split 'test'; give a 'split' column with test for the "
                        f"held-out images (train/val may stay blank). Received: labels={str(labels.path)!r}")
    patients, rules, has_dicom = _patients(root, labels, patient_pattern)
    explicit = _explicit_splits(rows, patients)
    pool: dict[str, list[int]] = {}
    for row in rows:
        if row.split is None and patients[row.path] not in explicit:
            pool.setdefault(patients[row.path], []).append(row.label)
    majority = {p: (max(set(values), key=values.count), len(values)) for p, values in pool.items()}
    grouped = split_patients(majority, seed, val_fraction, previous_split)
    records = sorted((
        ImageRecord(row.path, row.label, row.split or explicit.get(patients[row.path]) or grouped[patients[row.path]],
                    patients[row.path])
        for row in rows
    ), key=lambda r: r.path)
    if labels.kind == "multilabel":
        _check_labels_in_splits(labels, records)
    else:
        _check_classes_in_splits(labels, records)
    check_patients_disjoint(records)
    return ImageFolder(root, labels.class_names, tuple(records), (), tuple(rules), has_dicom, labels, labels.left_out)


def _patients(root: Path, labels: LabelFile, pattern: str | None) -> tuple[dict[str, str], list[str], bool]:
    """The ``patient`` column where a row gives one; the rules of ``patients.assign_patients`` elsewhere;
    and whether any file is DICOM."""
    paths = [row.path for row in labels.rows]
    dicom_ids, has_dicom = dicom_patient_ids(root, paths, sniff=True)
    derived, rules = assign_patients([r.path for r in labels.rows if r.patient is None], pattern, dicom_ids)
    if any(row.patient for row in labels.rows):
        rules = ["label file 'patient' column", *rules]
    return {row.path: row.patient or derived[row.path] for row in labels.rows}, rules, has_dicom


def _explicit_splits(rows, patients: dict[str, str]) -> dict[str, str]:
    """Patient -> split, for patients whose rows with a split all give the same one."""
    given: dict[str, set[str]] = {}
    for row in rows:
        if row.split is not None:
            given.setdefault(patients[row.path], set()).add(row.split)
    return {patient: splits.pop() for patient, splits in given.items() if len(splits) == 1}


def _check_classes_in_splits(labels: LabelFile, records: list[ImageRecord]) -> None:
    for split in ("train", "val", "test"):
        present = {r.label for r in records if r.split == split}
        missing = [name for i, name in enumerate(labels.class_names) if i not in present]
        if missing:
            raise DataError(f"Class {missing[0]!r} of {labels.path} has no image in the {split} split; every class "
                            f"needs images in train, val and test (give more rows or a 'split' column). "
                            f"Received: {split}={sorted(labels.class_names[i] for i in present)}")


def _check_labels_in_splits(labels: LabelFile, records: list[ImageRecord]) -> None:
    """Multi-label: every label has a 0 and a 1 among its certain rows of train, val and test (its ROC-AUC,
    threshold and metrics need both)."""
    split_of = {r.path: r.split for r in records}
    targets = labels.targets()
    for split in ("train", "val", "test"):
        rows = np.array([split_of[row.path] == split for row in labels.rows])
        for j, column in enumerate(labels.columns):
            values = targets[rows, j]
            present = sorted({int(v) for v in values[np.isfinite(values)]})
            if present != [0, 1]:
                raise DataError(f"Label {column!r} of {labels.path} needs both 0 and 1 among its certain rows of the "
                                f"{split} split (give more rows or a 'split' column). Received: {split}={present}")
