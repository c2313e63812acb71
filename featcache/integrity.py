"""Checks on what a stage reads back: JSON records (head.json, selection.json, model.json, report.json, the
split registry, a cache's manifest), SHA-256 digests of files and arrays, and Keras files loaded in safe mode.

Every failure is a one-line ``FeatcacheError`` naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from featcache.errors import CacheMismatchError, DamagedFileError

HEX64 = frozenset("0123456789abcdef")


def parse_json(text: str | bytes, source: str | Path, required: dict, fix: str) -> dict:
    """Parse a JSON object and check that it holds ``required`` fields of the given types.

    Args:
        text: the JSON text.
        source: what it came from (a path, or ``"<file> attribute manifest"``), for the message.
        required: field -> type or tuple of types; a field with slashes (``"files/keras_sha256"``) looks
            into nested objects. ``"sha256"`` as the type means a 64-digit lower-case hex string.
        fix: what the user should do, one sentence.

    Raises:
        DamagedFileError: not JSON, not an object, a field missing or of the wrong type.
    """
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DamagedFileError(f"{source} is not valid JSON ({first_line(exc)}); {fix} "
                               f"Received: {source_name(source)}") from None
    if not isinstance(value, dict):
        raise DamagedFileError(f"{source} holds a JSON {type(value).__name__}, not an object; {fix} "
                               f"Received: {source_name(source)}")
    for field, kind in required.items():
        problem = _field_problem(value, field, kind)
        if problem:
            raise DamagedFileError(f"{source} is not what featcache wrote: {problem}; {fix} "
                                   f"Received: {source_name(source)}")
    return value


def load_json(path: str | Path, required: dict, fix: str) -> dict:
    """``parse_json`` of a file's content; an unreadable file is the same one-line error."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_file():  # a FIFO or device would block or never end
        raise DamagedFileError(f"{path} is not a regular file; {fix} Received: {source_name(path)}")
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise DamagedFileError(f"Cannot read {path} ({exc.strerror}); {fix} Received: {source_name(path)}") from None
    return parse_json(text, path, required, fix)


def source_name(source: str | Path) -> str:
    return f"file={str(source)!r}"


def _field_problem(value: dict, field: str, kind) -> str | None:
    node = value
    for part in field.split("/"):
        if not isinstance(node, dict) or part not in node:
            return f"field {field!r} is missing"
        node = node[part]
    if kind == "sha256":
        ok = isinstance(node, str) and len(node) == 64 and set(node) <= HEX64
        return None if ok else f"field {field!r} is not a SHA-256 hex digest"
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(node, bool) and bool not in kinds:  # json true/false is not a number here
        return f"field {field!r} is {type(node).__name__}, expected {_names(kinds)}"
    if not isinstance(node, kinds):
        return f"field {field!r} is {type(node).__name__}, expected {_names(kinds)}"
    if isinstance(node, float) and not math.isfinite(node):
        return f"field {field!r} is {node}"
    return None


def _names(kinds: tuple) -> str:
    return " or ".join(k.__name__ for k in kinds)


def check_plain_name(name: str, source: str | Path, fix: str) -> str:
    """A file name recorded in a record must name a file in the same folder (no path, no '..')."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise DamagedFileError(f"{source} names {name!r}, not a file name in its folder; {fix} "
                               f"Received: {source_name(source)}")
    return name


def check_file_sha256(path: Path, expected: str, record: str | Path, fix: str) -> None:
    """Refuse a file whose SHA-256 is not the one ``record`` holds (swapped, edited or half written).

    Raises:
        CacheMismatchError: the file is missing or its content changed.
    """
    from featcache.data import hash_file  # data imports this module

    if not Path(path).is_file():
        raise CacheMismatchError(f"{path} is missing; {record} describes it. {fix} Received: {source_name(path)}")
    found = hash_file(path)
    if found != expected:
        raise CacheMismatchError(f"{path} has SHA-256 {found[:12]}, but {record} records {expected[:12]}: the file "
                                 f"was replaced or damaged. {fix} Received: {source_name(path)}")


def load_keras_checked(path: Path, expected_sha256: str, record: str | Path, fix: str):
    """Check a ``.keras`` file against its recorded SHA-256, then load it in safe mode (no custom objects).

    Raises:
        CacheMismatchError: the file is not the one ``record`` describes.
        DamagedFileError: Keras cannot load it (not a zip, refused by safe mode, damaged).
    """
    import keras

    check_file_sha256(path, expected_sha256, record, fix)
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as exc:  # noqa: BLE001 - BadZipFile, ValueError (safe mode), OSError, KeyError, ...
        raise DamagedFileError(f"Keras cannot load {path} in safe mode ({type(exc).__name__}: {first_line(exc)}); "
                               f"{fix} Received: {source_name(path)}") from None


def canonical_sha256(record: dict, skip: str) -> str:
    """SHA-256 of a record's canonical JSON (sorted keys), without the field ``skip`` that holds it."""
    payload = json.dumps({k: v for k, v in record.items() if k != skip}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def array_bytes(values: np.ndarray) -> bytes:
    """The bytes a digest covers: little-endian C-order numbers, or the JSON list of a string column."""
    values = np.asarray(values)
    if values.dtype.kind in "OU":
        return json.dumps([v.decode() if isinstance(v, bytes) else str(v) for v in values.tolist()]).encode()
    return np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes()


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), for one-line errors."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
