"""Shard files: self-contained blocks of cache rows that a master file maps as HDF5 virtual datasets.

A shard is ``<cache-dir>/<backbone>-<fingerprint12>.shards/<id>.h5``, written under ``<id>.h5.incomplete``
and renamed, so a file with the final name is always whole. It holds, for ``r`` rows::

    /features    (r, h, w, c) float16|float32   chunked, fletcher32
    /pooled      (r, c) float32                 chunked, fletcher32
    /path        (r,) str                       the row's file, relative to the data folder
    /sha256      (r,) S64                       the file's content hash
    /copy_index  (r,) int16                     0 original, 1..K augmented copies
    /features_digest, /pooled_digest  (r,) S16  each row's content digest (``checksums.row_content_digests``):
                                                what a master's checksums are made of, so sealing a master
                                                over shards reads 16 bytes a row, not the maps. Shards written
                                                before these existed lack them; their rows are read instead.
    attrs: shard (JSON: fingerprint, rows, datasets -> SHA-256 of the whole dataset), shard_sha256 (of
           that text, the shard's seal: the master records it), complete

A shard depends only on the extraction settings (the fingerprint), never on the file list, so any master
of the same settings can map its rows: a new file list writes only shards for its new rows. Its id is
the SHA-256 of its row keys, so the same rows always make the same file name. Whoever computed the rows
can write a shard on its own (no shared state but the folder); the master is written by one process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

import h5py
import numpy as np

from featcache.cache import INCOMPLETE_SUFFIX, POOLED_CHUNK_ROWS
from featcache.cachewrite import STR, atomic_h5, chunk_rows
from featcache.checksums import H5_ERRORS, row_content_digests
from featcache.errors import DamagedFileError
from featcache.integrity import array_bytes, first_line

log = logging.getLogger(__name__)

SHARD_SUFFIX = ".h5"
SHARD_DATASETS = ("features", "pooled", "path", "sha256", "copy_index")
DIGEST_DATASETS = {"features": "features_digest", "pooled": "pooled_digest"}  # optional (older shards lack them)
SHARD_BYTES = 64 * 2**20  # default shard size: large enough for few files, small enough to lose little on a kill
MAX_SHARD_ROWS = 2**17

RowKey = tuple  # (path, sha256, copy_index)
DIGEST = "S16"  # a row key's BLAKE2b-128: how extract matches a million rows in arrays, not in dictionaries


def default_shard_rows(feature_shape: tuple[int, ...], dtype: str, batch_size: int) -> int:
    """Rows per shard: about SHARD_BYTES of maps, at least one batch, at most MAX_SHARD_ROWS."""
    row_bytes = int(np.prod(feature_shape)) * np.dtype(dtype).itemsize + 4 * feature_shape[-1]
    return int(max(batch_size, min(MAX_SHARD_ROWS, SHARD_BYTES // row_bytes)))


def shard_id(keys: list[RowKey]) -> str:
    text = "\n".join(f"{p}|{s}|{k}" for p, s, k in keys)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def row_digests(keys) -> np.ndarray:
    """(n,) S16: the 16-byte BLAKE2b of each ``(path, sha256, copy_index)`` key, in order. Fixed-width bytes sort
    and compare by memcmp, so sets of row keys become sorted arrays (``RowIndex``, ``np.isin``)."""
    return np.array([hashlib.blake2b(f"{p}|{s}|{int(k)}".encode(), digest_size=16).digest() for p, s, k in keys],
                    DIGEST).reshape(-1)


class RowIndex:
    """Where each row lives: sorted row digests -> (file number, row in that file), as arrays.

    ``files`` are the shard files; a digest in several files keeps the first (by the order given).
    """

    def __init__(self, files: list[Path], parts: list[np.ndarray]):
        self.files = list(files)
        digests = np.concatenate(parts) if parts else np.empty(0, DIGEST)
        shard = np.repeat(np.arange(len(parts), dtype=np.int32), [len(d) for d in parts])
        offset = np.concatenate([np.arange(len(d), dtype=np.int32) for d in parts]) if parts else shard
        order = np.argsort(digests, kind="stable")
        digests, shard, offset = digests[order], shard[order], offset[order]
        first = np.ones(len(digests), bool)
        first[1:] = digests[1:] != digests[:-1]
        self.digests, self.shard, self.offset = digests[first], shard[first], offset[first]

    def __len__(self) -> int:
        return len(self.digests)

    def find(self, digests: np.ndarray) -> np.ndarray:
        """Positions in this index of ``digests`` (-1 where absent)."""
        if len(self.digests) == 0:
            return np.full(len(digests), -1)
        pos = np.minimum(np.searchsorted(self.digests, digests), len(self.digests) - 1)
        return np.where(self.digests[pos] == digests, pos, -1)

    def contains(self, digests: np.ndarray) -> np.ndarray:
        return self.find(digests) >= 0

    def locate(self, digests: np.ndarray) -> tuple[list[Path], np.ndarray, np.ndarray]:
        """(the shard files used, per row its number among them, its row in that file).

        Raises:
            KeyError: a row is in no shard.
        """
        pos = self.find(digests)
        if (pos < 0).any():
            raise KeyError(f"{int((pos < 0).sum())} rows are in no shard")
        used, number = np.unique(self.shard[pos], return_inverse=True)
        return [self.files[i] for i in used], number.reshape(-1), self.offset[pos]


def write_shard(folder: Path, fingerprint: str, features: np.ndarray, pooled: np.ndarray, keys: list[RowKey],
                compression: str | None = None) -> Path:
    """Write one shard atomically (``.incomplete``, fsync, rename) and return its final path.

    Raises:
        StorageError: the shard cannot be written (the temporary file is deleted).
    """
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{shard_id(keys)}{SHARD_SUFFIX}"
    n = len(keys)
    values = {"features": features, "pooled": np.asarray(pooled, np.float32),
              "path": np.array([k[0] for k in keys], dtype=object),
              "sha256": np.array([k[1] for k in keys], dtype="S64"),
              "copy_index": np.array([k[2] for k in keys], np.int16)}
    values.update({digest: row_content_digests(values[name]) for name, digest in DIGEST_DATASETS.items()})
    text = json.dumps({"fingerprint": fingerprint, "rows": n,
                       "datasets": {name: _sha256(array) for name, array in values.items()}}, sort_keys=True)
    with atomic_h5(final) as handle:
        shape = features.shape[1:]
        handle.create_dataset("features", data=features, fletcher32=True, compression=compression,
                              chunks=(min(chunk_rows(shape, str(features.dtype)), n), *shape))
        handle.create_dataset("pooled", data=values["pooled"], fletcher32=True, compression=compression,
                              chunks=(min(POOLED_CHUNK_ROWS, n), shape[-1]))
        for name in ("path", "sha256", "copy_index", *DIGEST_DATASETS.values()):
            array = values[name]
            handle.create_dataset(name, data=array, dtype=STR if array.dtype == object else array.dtype)
        handle.attrs["shard"] = text
        handle.attrs["shard_sha256"] = hashlib.sha256(text.encode()).hexdigest()
        handle.attrs["complete"] = True
    return final


def _sha256(values: np.ndarray) -> str:
    return hashlib.sha256(array_bytes(values)).hexdigest()


def read_seal(path: Path) -> tuple[dict, str]:
    """(the shard's JSON record, its seal) after checking the seal; metadata only.

    Raises:
        DamagedFileError: missing, not HDF5, not a complete shard, or an edited record.
    """
    if not path.is_file():
        raise DamagedFileError(f"Shard file {path} is missing. Received: shard={str(path)!r}")
    try:
        with h5py.File(path, "r") as handle:
            attrs = dict(handle.attrs)
    except H5_ERRORS as exc:
        raise DamagedFileError(f"Shard file {path} cannot be read ({first_line(exc)}). "
                               f"Received: shard={str(path)!r}") from None
    text, seal = attrs.get("shard"), attrs.get("shard_sha256")
    if not attrs.get("complete") or not isinstance(text, str) or not isinstance(seal, str) \
            or hashlib.sha256(text.encode()).hexdigest() != seal:
        raise DamagedFileError(f"Shard file {path} is not a complete, unedited featcache shard. "
                               f"Received: shard={str(path)!r}")
    return json.loads(text), seal


def content_digests(handle: h5py.File, name: str, record: dict) -> np.ndarray:
    """(rows,) S16: the ``row_content_digests`` of a shard's /features or /pooled, as written with the shard (and
    checked against its seal).

    A shard written before they were stored has its rows read instead, and checked against the SHA-256 its seal
    (``record``) holds, so a master never seals rows that changed since their shard was written.

    Raises:
        DamagedFileError: such a shard's rows differ from its seal.
    """
    stored = DIGEST_DATASETS.get(name)
    if stored is not None and stored in handle:
        digests = handle[stored][...]
        if _sha256(digests) != record["datasets"].get(stored):  # 16 bytes a row: always checked
            raise DamagedFileError(f"Shard file {handle.filename}: /{stored} does not match the SHA-256 recorded when "
                                   f"it was written. Received: shard={str(handle.filename)!r}")
        return digests
    dataset, whole = handle[name], hashlib.sha256()
    block = max(1, SHARD_BYTES // max(1, dataset.dtype.itemsize * int(np.prod(dataset.shape[1:]))))
    digests = []
    for start in range(0, len(dataset), block):
        values = dataset[start:start + block]
        whole.update(array_bytes(values))
        digests.append(row_content_digests(values))
    if whole.hexdigest() != record["datasets"].get(name):
        raise DamagedFileError(f"Shard file {handle.filename}: /{name} does not match the SHA-256 recorded when it "
                               f"was written. Received: shard={str(handle.filename)!r}")
    return np.concatenate(digests) if digests else np.empty(0, "S16")


def read_keys(path: Path) -> list[RowKey]:
    """The row keys of a shard, in row order."""
    with h5py.File(path, "r") as handle:
        paths = handle["path"].asstr()[...].tolist()
        shas = handle["sha256"][...].astype(str).tolist()
        copies = handle["copy_index"][...].tolist()
    return list(zip(paths, shas, copies))


def check_shard(path: Path, fingerprint: str | None = None) -> dict:
    """Read a whole shard and compare every dataset with the SHA-256 in its sealed record.

    Returns:
        The shard's record.

    Raises:
        DamagedFileError: missing, unreadable, edited, another fingerprint, or data that differs.
    """
    record, _ = read_seal(path)
    if fingerprint is not None and record.get("fingerprint") != fingerprint:
        raise DamagedFileError(f"Shard file {path} belongs to other settings (fingerprint "
                               f"{str(record.get('fingerprint'))[:12]}). Received: shard={str(path)!r}")
    try:
        with h5py.File(path, "r") as handle:
            for name in (*SHARD_DATASETS, *(d for d in DIGEST_DATASETS.values() if d in record["datasets"])):
                dataset = handle[name]
                values = dataset.asstr()[...] if dataset.dtype.kind == "O" else dataset[...]
                if len(values) != record["rows"] or _sha256(values) != record["datasets"].get(name):
                    raise DamagedFileError(f"Shard file {path}: /{name} does not match the SHA-256 recorded when it "
                                           f"was written. Received: shard={str(path)!r}")
    except DamagedFileError:
        raise
    except H5_ERRORS as exc:
        raise DamagedFileError(f"Shard file {path} cannot be read ({first_line(exc)}). "
                               f"Received: shard={str(path)!r}") from None
    return record


class ShardStore:
    """The shard files of one cache's settings, in ``<name>.shards/``."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self._keys: dict[Path, np.ndarray] = {}  # shard -> its rows' digests (row_digests), in row order

    def files(self) -> list[Path]:
        return sorted(self.folder.glob(f"*{SHARD_SUFFIX}")) if self.folder.is_dir() else []

    def index(self, trusted: set[str] = frozenset()) -> RowIndex:
        """Where every row of every usable shard is (``RowIndex``); each shard's keys are read once per process.

        ``trusted`` shards (the file names a complete master maps, whose rows its checksums cover) are only
        opened for their keys; any other shard is read whole and checked against its own SHA-256s
        first, and one that fails (damaged, cut short, other settings) is deleted with a warning, so its
        rows are computed again. A row in several shards is taken from the first by name.
        """
        usable = []
        for shard in self.files():
            if shard not in self._keys:
                try:
                    if shard.name not in trusted:
                        check_shard(shard, self.fingerprint)
                    self._keys[shard] = row_digests(read_keys(shard))
                except (DamagedFileError, *H5_ERRORS) as exc:
                    log.warning("Ignoring unusable shard %s; its rows are computed again (%s)", shard.name,
                                first_line(exc))
                    with contextlib.suppress(OSError):
                        shard.unlink()
                    continue
            usable.append(shard)
        return RowIndex(usable, [self._keys[shard] for shard in usable])

    def add(self, path: Path, keys: list[RowKey]) -> None:
        """Record a shard this process has just written (its keys are known)."""
        self._keys[path] = row_digests(keys)

    def remove_leftovers(self) -> None:
        """Temporary files of writers that were killed (the caller holds the cache's lock)."""
        for tmp in self.folder.glob(f"*{INCOMPLETE_SUFFIX}") if self.folder.is_dir() else []:
            with contextlib.suppress(OSError):
                tmp.unlink()
