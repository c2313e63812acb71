"""Patient ids of image files, by the first rule that applies, and the checks that the grouping is sane.

1. a ``patient`` column of the label file (decided by the caller, not here);
2. ``--patient-pattern REGEX``: its first group (else the whole match) searched in the relative path;
3. the DICOM PatientID tag;
4. the Kermany file-name rule (``PATIENT_PATTERN`` on the file stem);
5. the file stem, when the file name is unique in the tree; else the nearest folder that makes it unique
   (CheXpert's ``patient00001/study1/view1_frontal.jpg`` -> ``patient00001``), never a layout folder
   (``train/NORMAL``), where the file is its own patient.
"""

from __future__ import annotations

import ast
import logging
import re
from collections import Counter
from pathlib import PurePosixPath

from featcache.errors import DataError

log = logging.getLogger(__name__)

# Kermany file names: person1430_bacteria_3695.jpeg, IM-0115-0001.jpeg, NORMAL2-IM-0373-0001.jpeg.
PATIENT_PATTERN = r"^(person\d+|NORMAL2-IM-\d+|IM-\d+)"

# Rule descriptions recorded in a cache's fingerprint when they decided some patient (the Kermany
# rule alone records nothing new, so the caches of Kermany folders keep their fingerprints).
FOLDER_RULE = "repeated file names: the nearest folder that makes the path unique"
DICOM_RULE = "DICOM PatientID tag"

# Below this many images, "every image is its own patient" is no sign of a wrong rule.
MIN_IMAGES_FOR_WARNING = 10


def check_patient_pattern(pattern: str) -> re.Pattern:
    """The compiled ``--patient-pattern``.

    Raises:
        DataError: not a valid regular expression.
    """
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise DataError(f"--patient-pattern is not a valid regular expression ({exc}). Received: "
                        f"patient_pattern={pattern!r}") from None


def patient_id(filename: str, pattern: str = PATIENT_PATTERN) -> str:
    """The patient a file belongs to by its name alone: the match of ``pattern``, or the file stem if none."""
    stem = PurePosixPath(filename).stem
    match = re.match(pattern, stem)
    return match.group(1) if match else stem


def assign_patients(paths: list[str], pattern: str | None = None, dicom_ids: dict[str, str] | None = None,
                    layout_depth: int = 0) -> tuple[dict[str, str], list[str]]:
    """Patient id of each relative path, by rules 2-5 of the module docstring.

    Args:
        paths: relative POSIX paths of every image of the data set (the whole tree: uniqueness is judged here).
        pattern: ``--patient-pattern``, searched in each path; every path must match.
        dicom_ids: path -> PatientID of the DICOM files that carry one.
        layout_depth: leading folders that are layout, not patients (2 for ``train/CLASS/``).

    Returns:
        (path -> patient id, descriptions of the rules beyond the Kermany name rule that decided some id).

    Raises:
        DataError: a path the pattern does not match.
    """
    dicom_ids = dicom_ids or {}
    if pattern is not None:
        compiled = check_patient_pattern(pattern)
        ids = {}
        for path in paths:
            match = compiled.search(path)
            if not match:
                misses = sum(1 for p in paths if not compiled.search(p))
                raise DataError(f"--patient-pattern matches no patient in {path} ({misses} of {len(paths)} paths do "
                                f"not match). Received: patient_pattern={pattern!r}")
            ids[path] = next((g for g in match.groups() if g), match.group(0))
        return ids, [pattern_rule(pattern)]
    parts = {path: path.split("/") for path in paths}  # relative POSIX paths: str.split, 10x PurePosixPath
    names = Counter(split[-1] for split in parts.values())
    suffixes = _suffix_counts(parts, names)
    kermany = re.compile(PATIENT_PATTERN).match
    ids, rules = {}, set()
    for path, split in parts.items():
        name = split[-1]
        if path in dicom_ids:
            ids[path] = dicom_ids[path]
            rules.add(DICOM_RULE)
        elif (match := kermany(stem := _stem(name))) or names[name] == 1:
            ids[path] = match.group(1) if match else stem
        else:
            ids[path] = _nearest_unique_folder(path, split, suffixes, layout_depth)
            rules.add(FOLDER_RULE)
    return ids, sorted(rules)


def pattern_rule(pattern: str) -> str:
    """How the cache's split records that ``--patient-pattern`` decided the patient ids."""
    return f"--patient-pattern {pattern!r} over the relative path (first group)"


def pattern_of_rule(rule: str) -> str | None:
    """The pattern of a ``pattern_rule`` description (None for the other rules): the card's extract command."""
    match = re.fullmatch(r"--patient-pattern (.+) over the relative path \(first group\)", rule)
    return ast.literal_eval(match.group(1)) if match else None


def _stem(name: str) -> str:
    """``PurePosixPath(name).stem``: the name without its last suffix (a leading dot is no suffix)."""
    at = name.rfind(".")
    return name[:at] if at > 0 and at < len(name) - 1 else name


def _suffix_counts(parts: dict[str, list[str]], names: Counter) -> Counter:
    """How many paths end with each tail of folders + name, for the paths whose name repeats."""
    counts: Counter = Counter()
    for split in parts.values():
        if names[split[-1]] > 1:
            counts.update("/".join(split[-k:]) for k in range(2, len(split) + 1))
    return counts


def _nearest_unique_folder(path: str, parts: list[str], suffixes: Counter, layout_depth: int) -> str:
    """The folder that heads the shortest unique tail of ``path``; the path without its suffix (its own
    patient) when only layout folders make it unique."""
    for k in range(2, len(parts) + 1):
        if suffixes["/".join(parts[-k:])] == 1:
            at = len(parts) - k
            if at >= layout_depth:
                return parts[at]
            break
    return "/".join([*parts[:-1], _stem(parts[-1])])


def describe_patients(patients: list[str]) -> str:
    """One line with the number of patients and images; warnings logged when the grouping looks wrong:
    every image its own patient (no grouping at all), or one patient holding more than half the images."""
    counts = Counter(patients)
    line = f"{len(counts)} patients in {len(patients)} images"
    if len(patients) >= MIN_IMAGES_FOR_WARNING and len(counts) == len(patients):
        log.warning("WARNING: every one of the %d images is its own patient: the patient-grouped validation split "
                    "cannot keep a patient's images together. If patients have several images, give a 'patient' "
                    "column in --labels or --patient-pattern REGEX (its first group is the id).", len(patients))
    top, most = counts.most_common(1)[0] if counts else ("", 0)
    if len(patients) >= 2 and most > len(patients) / 2:
        log.warning("WARNING: patient %r holds %d of the %d images (more than half): the patient ids are probably "
                    "wrong. Give a 'patient' column in --labels or --patient-pattern REGEX.", top, most, len(patients))
    return line
