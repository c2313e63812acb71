"""Integrity of a cache's datasets: SHA-256 digests computed while the file is written and checked when it is
read, the value ranges of every column, and the layout (which datasets, which lengths).

Per-row datasets are digested **per split** (``train``, ``val``, ``test``), so a stage can check exactly the
rows it reads: ``train-head`` checks the train and validation rows of ``pooled`` without touching the test
rows, ``evaluate`` the test rows of ``features``. ``featcache verify`` checks everything.

Two schemes, named in each dataset's manifest record (``scheme``):

- ``stream`` (no ``scheme`` key: every cache written before it existed): the SHA-256 of the rows' bytes, in
  row order.
- ``rows`` (``features`` and ``pooled`` of caches written now): the SHA-256 of the rows' own 16-byte digests
  (``row_content_digests``: each row's SHA-256, truncated), in row order. It composes: shards store their rows'
  digests, so a master over shards is sealed from 16 bytes a row instead of re-reading every map, and adding
  images to a cache costs the new rows, not a read of the whole cache. A reader recomputes the row digests
  from the bytes it reads, so damage is found exactly as with ``stream``.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager

import h5py
import numpy as np

from featcache.data import SPLIT_CODES, SPLITS
from featcache.errors import DamagedFileError, FeatcacheError
from featcache.integrity import array_bytes, first_line

ROW_DATASETS = ("features", "pooled", "labels", "source_index", "copy_index", "targets")  # digested per split
WHOLE_DATASETS = ("split", "files/path", "files/sha256", "files/label", "files/split", "files/patient")
OPTIONAL_DATASETS = ("targets",)  # (n, k) float32 0/1, NaN masked: multi-label caches only (featcache.cache)
DATASETS = tuple(name for name in (*ROW_DATASETS, *WHOLE_DATASETS) if name not in OPTIONAL_DATASETS)
WHOLE = "all"
STREAM_BYTES = 64 * 2**20  # block size when a whole dataset is checked
H5_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError)  # what h5py raises on damaged files
ROW_SCHEME = "rows"
BY_ROW = ("features", "pooled")  # the datasets written with the ``rows`` scheme
ROW_DIGEST = "S16"


def row_content_digests(values: np.ndarray) -> np.ndarray:
    """(n,) S16: the SHA-256 of each row's bytes (little-endian C order, as ``array_bytes``), first 16 bytes."""
    values = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    if len(values) == 0:
        return np.empty(0, ROW_DIGEST)
    flat = values.reshape(len(values), -1).view(np.uint8)
    return np.array([hashlib.sha256(row).digest()[:16] for row in flat], ROW_DIGEST).reshape(-1)


class Digests:
    """Running SHA-256 of each dataset: per split for ``ROW_DATASETS``, of the whole for the others; the names in
    ``by_row`` with the ``rows`` scheme (module docstring)."""

    def __init__(self, names=(*DATASETS, *OPTIONAL_DATASETS), by_row=()):
        self.by_row = frozenset(by_row)
        self._hashes: dict[str, dict[str, "hashlib._Hash"]] = {}
        for name in names:
            for part in SPLITS if name in ROW_DATASETS else (WHOLE,):
                self._hashes.setdefault(name, {})[part] = hashlib.sha256()

    def update(self, name: str, values: np.ndarray, split: np.ndarray | None = None) -> None:
        """Add the next rows of ``name`` (``split``: their split codes, for per-row datasets)."""
        if name not in ROW_DATASETS:
            self._hashes[name][WHOLE].update(array_bytes(values))
        elif name in self.by_row:
            self.update_rows(name, row_content_digests(values), split)
        else:
            for code, part in enumerate(SPLITS):
                self._hashes[name][part].update(array_bytes(values[split == code]))

    def update_rows(self, name: str, digests: np.ndarray, split: np.ndarray) -> None:
        """Add the next rows of a ``by_row`` dataset by their ``row_content_digests`` (``split``: their split codes)."""
        digests = np.asarray(digests, ROW_DIGEST)
        for code, part in enumerate(SPLITS):
            self._hashes[name][part].update(digests[split == code].tobytes())

    def hexdigests(self) -> dict[str, dict[str, str]]:
        return {name: {part: h.hexdigest() for part, h in parts.items()} for name, parts in self._hashes.items()}


def dataset_records(handle: h5py.File, digests: Digests) -> dict:
    """What the manifest records of each dataset: shape, dtype and SHA-256 (per split or whole); the optional
    datasets only where the file has them (a binary or multi-class cache's record is unchanged)."""
    found = digests.hexdigests()
    names = (*DATASETS, *(name for name in OPTIONAL_DATASETS if name in handle))
    return {name: {"shape": list(handle[name].shape), "dtype": str(handle[name].dtype), "sha256": found[name],
                   **({"scheme": ROW_SCHEME} if name in digests.by_row else {})}
            for name in names}


def present_datasets(manifest: dict) -> tuple[str, ...]:
    """The datasets a cache has: every required one, and /targets in a multi-label cache."""
    return (*DATASETS, *(name for name in OPTIONAL_DATASETS if name in manifest.get("datasets", {})))


def recorded_by_row(handle: h5py.File, name: str) -> tuple[str, ...]:
    """``(name,)`` when the manifest records ``name`` with the ``rows`` scheme, else ``()``."""
    record = json.loads(handle.attrs["manifest"])["datasets"].get(name, {})
    return (name,) if record.get("scheme") == ROW_SCHEME else ()


def check_layout(handle: h5py.File, manifest: dict) -> None:
    """Every dataset present, of the shape and dtype the manifest records, with consistent lengths.

    Raises:
        DamagedFileError: a dataset is missing or differs from its record.
    """
    path = handle.filename
    if manifest.get("task") == "multilabel" and "targets" not in manifest["datasets"]:
        _damaged(path, "it is a multi-label cache without a /targets record", "dataset='targets'")
    names = present_datasets(manifest)
    shapes = {}  # each dataset opened once: opening a virtual one parses all its mappings
    for name in names:
        record = manifest["datasets"].get(name)
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), dict):
            _damaged(path, f"its manifest has no checksum record for /{name}", f"dataset={name!r}")
        dataset = handle.get(name)
        if not isinstance(dataset, h5py.Dataset):
            _damaged(path, f"dataset /{name} is missing", f"dataset={name!r}")
        shape, dtype = list(dataset.shape), str(dataset.dtype)
        if shape != record.get("shape") or dtype != record.get("dtype"):
            _damaged(path, f"/{name} is {tuple(shape)} {dtype}, its record says {record.get('shape')} "
                           f"{record.get('dtype')}", f"dataset={name!r}")
        shapes[name] = shape
    n, m = handle["split"].shape[0], handle["files/path"].shape[0]
    for name in names:
        expected = n if name in ROW_DATASETS or name == "split" else m
        if shapes[name][0] != expected:
            _damaged(path, f"/{name} has {shapes[name][0]} rows, expected {expected}", f"dataset={name!r}")


def read_checked(handle: h5py.File, name: str, split: np.ndarray | None = None, parts=SPLITS) -> np.ndarray:
    """A dataset of an open cache, its values and SHA-256 checked against the manifest.

    Args:
        handle: from ``cache.open_cache`` (layout already checked).
        name: one of ``DATASETS``.
        split: for ``ROW_DATASETS``, the whole /split column (itself read with ``read_checked``).
        parts: for ``ROW_DATASETS``, the splits whose rows are read (in row order); only those are checked.

    Returns:
        The values: (rows in ``parts``, ...) for per-row datasets; strings as str for the string columns.

    Raises:
        DamagedFileError: unreadable chunks (HDF5's fletcher32 check included), out-of-range values, or a
            SHA-256 that differs from the one recorded when the file was written.
    """
    if name in ROW_DATASETS:
        rows = CheckedRows(handle, name, split, parts)
        values = rows.read(len(rows.rows))
        rows.finish()
        return values
    with _reading(handle, name):
        values = _read(handle, name, None)
        _check_values(handle, name, values)
        digests = Digests((name,))
        digests.update(name, values)
        _compare(handle, name, digests, (WHOLE,))
    return values


class CheckedRows:
    """The rows of ``parts`` of one per-row dataset, read block by block in row order.

    Each block's values are checked as it is read (and HDF5's fletcher32 check runs on every chunk it
    touches); its bytes go into a running SHA-256 of those splits, which ``finish()`` compares with the
    manifest once every row has been read. So a stage can use /features a batch at a time and still have
    checked exactly the rows it used, without ever holding them all: a caller must not act on what it
    read (write anything) before ``finish()`` returned.

    Attributes:
        rows: (k,) increasing row numbers of the splits in ``parts``, the order ``read`` returns them in.
    """

    def __init__(self, handle: h5py.File, name: str, split: np.ndarray, parts=SPLITS):
        if name not in ROW_DATASETS:
            raise ValueError(f"CheckedRows reads per-row datasets only. Received: name={name!r}")
        self._handle, self._name, self._split, self._parts = handle, name, split, tuple(parts)
        self.rows = np.flatnonzero(np.isin(split, [SPLIT_CODES[p] for p in self._parts]))
        self._done = 0
        self._digests = Digests((name,), recorded_by_row(handle, name))

    def read(self, count: int) -> np.ndarray:
        """The values of the next ``count`` rows (fewer at the end): (count, ...)."""
        rows = self.rows[self._done:self._done + count]
        with _reading(self._handle, self._name):
            values = _read(self._handle, self._name, rows)
            _check_values(self._handle, self._name, values)
        self._digests.update(self._name, values, self._split[rows])
        self._done += len(rows)
        return values

    def finish(self) -> None:
        """Compare the digest of every row read with the manifest's.

        Raises:
            DamagedFileError: a digest differs.
            ValueError: not every row was read (a bug of the caller).
        """
        if self._done != len(self.rows):
            raise ValueError(f"/{self._name}: {self._done} of {len(self.rows)} rows read before finish(). "
                             f"Received: parts={self._parts}")
        _compare(self._handle, self._name, self._digests, self._parts)


def check_dataset(handle: h5py.File, name: str, split: np.ndarray) -> None:
    """Check a whole dataset (every split), streamed in blocks so /features never has to fit in memory.

    Raises:
        DamagedFileError: as ``read_checked``.
    """
    if name not in ROW_DATASETS:
        read_checked(handle, name)
        return
    dataset = handle[name]
    row_bytes = max(1, int(np.prod(dataset.shape[1:])) * dataset.dtype.itemsize)
    rows = CheckedRows(handle, name, split, SPLITS)
    for _ in range(0, len(rows.rows), max(1, STREAM_BYTES // row_bytes)):
        rows.read(max(1, STREAM_BYTES // row_bytes))
    rows.finish()


@contextmanager
def _reading(handle: h5py.File, name: str):
    """h5py's errors on damaged chunks or object headers (fletcher32 failures included) -> one line."""
    try:
        yield
    except FeatcacheError:
        raise
    except H5_ERRORS as exc:
        _damaged(handle.filename, f"/{name} cannot be read ({first_line(exc)})", f"dataset={name!r}")


def _read(handle: h5py.File, name: str, rows) -> np.ndarray:
    from featcache.cache import read_rows  # cache imports this module

    dataset = handle[name]
    if isinstance(rows, np.ndarray):
        return read_rows(dataset, rows)
    if dataset.dtype.kind == "O":
        return dataset.asstr()[...]
    return dataset[rows if rows is not None else ...]


def _check_values(handle: h5py.File, name: str, values: np.ndarray) -> None:
    """NaN/inf in the float arrays; labels, split codes, file rows and copy indices out of range."""
    if name == "targets":  # 0/1, NaN where masked (--uncertain ignore)
        bad = ~(np.isnan(values) | (values == 0) | (values == 1))
        if bad.any():
            _damaged(handle.filename, f"/targets holds {int(bad.sum())} values other than 0, 1 or NaN",
                     f"targets={values[bad][0]!r}")
        return
    if name in ("features", "pooled"):
        bad = ~np.isfinite(values)
        if bad.any():
            _damaged(handle.filename, f"/{name} holds {int(bad.sum())} NaN or infinite values", f"dataset={name!r}")
        return
    manifest = json.loads(handle.attrs["manifest"])
    n_classes = len(manifest["class_names"])
    if manifest.get("task") == "multilabel" and name in ("labels", "files/label"):  # no class index: always -1
        if (values != -1).any():
            _damaged(handle.filename, f"/{name} of a multi-label cache holds values other than -1",
                     f"{name}={values[values != -1][0]!r}")
        return
    limits = {"labels": n_classes, "files/label": n_classes, "split": len(SPLITS), "files/split": len(SPLITS),
              "source_index": handle["files/path"].shape[0], "copy_index": np.iinfo(np.int16).max + 1}
    if name not in limits:
        return
    bad = (values < 0) | (values >= limits[name])
    if bad.any():
        example = values[bad][0]
        _damaged(handle.filename, f"/{name} holds {int(bad.sum())} values outside 0..{limits[name] - 1}",
                 f"{name}={example!r}")


def _compare(handle: h5py.File, name: str, digests: Digests, parts) -> None:
    recorded = json.loads(handle.attrs["manifest"])["datasets"][name]["sha256"]
    found = digests.hexdigests()[name]
    for part in parts:
        if recorded.get(part) != found[part]:
            rows = "" if part == WHOLE else f" ({part} rows)"
            _damaged(handle.filename, f"/{name}{rows} does not match the SHA-256 recorded when the cache was "
                                      "written (edited or damaged since)", f"dataset={name!r}")


def _damaged(path, problem: str, received: str):
    raise DamagedFileError(f"Cache {path} is damaged: {problem}. Delete it and re-run 'featcache extract'. "
                           f"Received: {received}")
