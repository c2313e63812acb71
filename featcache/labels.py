"""Label files: a CSV naming each image (``path`` relative to the data folder), its label column(s) and,
optionally, its ``patient`` and ``split``; read, validated row by row, uncertain labels resolved.

Kinds: one column of class names (``single``); one column of 0/1 (``binary``: two classes, the reference
head); several 0/1 columns (``multilabel``: the multi-label head, ``featcache.multilabel``; the cache stores
the targets as /targets).
In 0/1 columns ``-1`` (CheXpert's uncertain) and blanks follow ``--uncertain``: ``ignore`` (masked: a
row whose single column is masked is left out), ``zero`` or ``one``. A blank class name leaves its row out.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from featcache.errors import DataError

UNCERTAIN_POLICIES = ("ignore", "zero", "one")
RESERVED_COLUMNS = ("path", "patient", "split")
ROW_SPLITS = ("train", "val", "test")
BINARY_VALUES = {-1.0, 0.0, 1.0}


@dataclass(frozen=True)
class LabeledRow:
    """One usable row: ``path`` (normalised, relative), ``label`` class index (single/binary) or -1
    (multilabel), ``targets`` (k,) float 0/1 with NaN where masked, ``patient`` and ``split`` or None, the
    CSV ``line`` number."""

    path: str
    label: int
    targets: tuple[float, ...]
    patient: str | None
    split: str | None
    line: int


@dataclass(frozen=True)
class LabelFile:
    """A validated label file: ``kind`` single|binary|multilabel, ``columns`` the label columns,
    ``class_names`` (single/binary), ``rows`` usable, ``left_out`` {"path", "line", "reason"} of rows
    without a certain label."""

    path: Path
    sha256: str
    kind: str
    columns: tuple[str, ...]
    class_names: tuple[str, ...]
    uncertain: str
    rows: tuple[LabeledRow, ...]
    left_out: tuple[dict, ...]

    def settings(self) -> dict:
        """What the cache fingerprint records of the label file: its content hash and the options."""
        return {"sha256": self.sha256, "kind": self.kind, "columns": list(self.columns), "uncertain": self.uncertain}

    def targets(self) -> np.ndarray:
        """(n, k) float32 0/1 targets of the rows, NaN where masked (multi-label loss and metrics)."""
        return np.array([row.targets for row in self.rows], np.float32).reshape(len(self.rows), len(self.columns))


def read_label_file(path: str | Path, data_dir: str | Path, label_columns: tuple[str, ...] | None = None,
                    uncertain: str = "ignore") -> LabelFile:
    """Read and validate a label file against the data folder.

    Raises:
        DataError: one line naming the row or column: no ``path`` column, an unknown label column, a path
            that escapes the data folder or does not exist in it, a duplicate path, an unknown split, a
            non-numeric or non-0/1 value in a 0/1 column, or a label column with a single value.
    """
    path, root = Path(path), Path(data_dir)
    if not root.is_dir():
        raise DataError(f"Data folder {root} does not exist; --labels paths are relative to --data. "
                        f"Received: data={str(data_dir)!r}")
    if uncertain not in UNCERTAIN_POLICIES:
        raise DataError(f"--uncertain must be one of {UNCERTAIN_POLICIES}. Received: uncertain={uncertain!r}")
    try:
        content = path.read_bytes()
        text = content.decode("utf-8-sig")
    except OSError as exc:
        raise DataError(f"Cannot read label file {path}: {exc.strerror}. Received: labels={str(path)!r}") from None
    except UnicodeDecodeError:
        raise DataError(f"Label file {path} is not UTF-8 text; save it as UTF-8 CSV. "
                        f"Received: labels={str(path)!r}") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [name.strip() for name in reader.fieldnames or []]
    columns = _label_columns(path, header, label_columns)
    raw = [{(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    if not raw:
        raise DataError(f"Label file {path} has a header but no rows. Received: labels={str(path)!r}")
    paths = _check_paths(path, root, raw)
    for line, row in enumerate(raw, start=2):
        if row.get("split", "") not in ("", *ROW_SPLITS):
            raise DataError(f"{path} line {line}: split {row['split']!r} is not train, val, test or blank. "
                            f"Received: split={row['split']!r}")
    kind = "multilabel" if len(columns) > 1 else _single_kind(path, raw, columns[0])
    if kind == "single":
        return _class_name_file(path, content, columns[0], uncertain, raw, paths)
    return _binary_file(path, content, kind, columns, uncertain, raw, paths)


def _label_columns(path: Path, header: list[str], wanted: tuple[str, ...] | None) -> tuple[str, ...]:
    if "path" not in header:
        raise DataError(f"Label file {path} has no 'path' column; its header is {header}. "
                        f"Received: labels={str(path)!r}")
    available = [h for h in header if h not in RESERVED_COLUMNS and h]
    if wanted:
        unknown = [c for c in wanted if c not in available]
        if unknown:
            raise DataError(f"--label-columns {unknown[0]!r} is not a label column of {path}; it has {available}. "
                            f"Received: label_columns={list(wanted)}")
        return tuple(wanted)
    if not available:
        raise DataError(f"Label file {path} has no label column besides path/patient/split. Received: header={header}")
    return tuple(available)


def _check_paths(path: Path, root: Path, raw: list[dict]) -> list[str]:
    """Normalised relative paths; each inside ``root``, existing, and listed once."""
    seen: dict[str, int] = {}
    out = []
    for line, row in enumerate(raw, start=2):
        given = row.get("path", "")
        pure = PurePosixPath(given.replace("\\", "/"))
        if not given or pure.is_absolute() or ".." in pure.parts or given.startswith("~") or ":" in pure.parts[0]:
            raise DataError(f"{path} line {line}: path {given!r} is not a path inside the data folder (relative, no "
                            f"'..'). Received: path={given!r}")
        normal = pure.as_posix()
        if normal in seen:
            raise DataError(f"{path} line {line}: path {normal!r} is listed twice (also line {seen[normal]}); one row "
                            f"per image. Received: path={given!r}")
        seen[normal] = line
        if not (root / normal).is_file():
            problem = "is a folder, not a file" if (root / normal).is_dir() else "does not exist"
            raise DataError(f"{path} line {line}: {normal} {problem} in {root}. Received: path={given!r}")
        out.append(normal)
    return out


def _number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return None if math.isnan(number) else number


def _single_kind(path: Path, raw: list[dict], column: str) -> str:
    """``binary`` when every value of the column is blank, -1, 0 or 1; ``single`` (class names) when none is a
    number; a column that mixes numbers and names is refused."""
    values = [(line, row.get(column, "")) for line, row in enumerate(raw, start=2) if row.get(column, "")]
    numeric = [(line, v) for line, v in values if _number(v) is not None]
    if not numeric:
        return "single"
    names = [(line, v) for line, v in values if _number(v) is None]
    if names:
        line, value = names[0]
        raise DataError(f"{path} line {line}: column {column!r} holds {value!r} among numbers; a 0/1 column takes "
                        f"0, 1, -1 (uncertain) or blank. Received: {column}={value!r}")
    if all(_number(v) in BINARY_VALUES for _, v in numeric):
        return "binary"
    return "single"  # numeric class codes (0, 1, 2, ...) are class names


def _class_name_file(path, content, column, uncertain, raw, paths) -> LabelFile:
    names = tuple(sorted({row[column] for row in raw if row.get(column, "")}))
    _check_varies(path, column, names)
    rows, left_out = [], []
    for line, (row, file) in enumerate(zip(raw, paths), start=2):
        value = row.get(column, "")
        if not value:
            left_out.append({"path": file, "line": line, "reason": f"blank {column}"})
            continue
        rows.append(LabeledRow(file, names.index(value), (), row.get("patient") or None, row.get("split") or None,
                               line))
    return LabelFile(path, hashlib.sha256(content).hexdigest(), "single", (column,), names, uncertain, tuple(rows),
                     tuple(left_out))


def _binary_file(path, content, kind, columns, uncertain, raw, paths) -> LabelFile:
    resolved = {"ignore": math.nan, "zero": 0.0, "one": 1.0}[uncertain]
    table = []
    for line, row in enumerate(raw, start=2):
        values = []
        for column in columns:
            value = row.get(column, "")
            number = _number(value) if value else -1.0
            if number is None or number not in BINARY_VALUES:
                hint = "; choose the target columns with --label-columns" if len(columns) > 1 else ""
                raise DataError(f"{path} line {line}: column {column!r} holds {value!r}; a 0/1 column takes 0, 1, -1 "
                                f"(uncertain) or blank{hint}. Received: {column}={value!r}")
            values.append(resolved if number == -1.0 else number)
        table.append(values)
    array = np.array(table, np.float64)
    for j, column in enumerate(columns):
        _check_varies(path, column, tuple(sorted({str(int(v)) for v in array[:, j] if not math.isnan(v)})))
    rows, left_out = [], []
    for line, (row, file, values) in enumerate(zip(raw, paths, table), start=2):
        if kind == "binary" and math.isnan(values[0]):
            left_out.append({"path": file, "line": line,
                             "reason": f"uncertain or blank {columns[0]} (--uncertain ignore)"})
            continue
        label = int(values[0]) if kind == "binary" else -1
        rows.append(LabeledRow(file, label, tuple(values), row.get("patient") or None, row.get("split") or None, line))
    names = (f"not_{columns[0]}", columns[0]) if kind == "binary" else tuple(columns)
    return LabelFile(path, hashlib.sha256(content).hexdigest(), kind, tuple(columns), names, uncertain, tuple(rows),
                     tuple(left_out))


def _check_varies(path: Path, column: str, values: tuple[str, ...]) -> None:
    if len(values) < 2:
        raise DataError(f"Label column {column!r} of {path} has a single value {list(values)} over all its certain "
                        f"rows; a target needs at least two. Received: {column}={list(values)}")
