"""Work in progress of one cache: finished batches, their packing into shards, reusable rows of an older
cache, and the assembly of the master file.

Each finished extraction batch is one ``.npz`` in ``<name>.partial/``, written under a temporary
name and renamed, so a killed run loses at most the batches in flight. Once a shard's worth of rows
has gathered, ``ShardPacker`` writes them into one shard file (``featcache.shards``) and deletes the
batches. When every row is in a shard, ``assemble_cache`` writes the small master file that maps them
(``featcache.master``); nothing is copied twice, so the disk holds the cache plus one shard in flight.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.cache import CachePaths, open_cache
from featcache.cachewrite import FileTable
from featcache.checksums import check_dataset, read_checked
from featcache.data import SPLIT_CODES
from featcache.errors import FeatcacheError, storage_error
from featcache.master import write_master
from featcache.shards import RowIndex, ShardStore, row_digests, write_shard

log = logging.getLogger(__name__)

SAVED_WEIGHTS = "backbone.weights.h5"  # random initialisations, in the work folder until the cache is whole


class BatchStore:
    """Finished extraction batches of one cache, one ``.npz`` each, in ``<name>.partial/``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._checked: dict[Path, list[tuple[str, str, int]]] = {}  # batch file -> its row keys, known whole

    def write(self, batch_id: str, features: np.ndarray, pooled: np.ndarray, paths: list[str],
              sha256: list[str], copy_index: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{batch_id}.tmp.npz"
        try:
            with open(tmp, "wb") as handle:
                np.savez(handle, features=features, pooled=pooled, path=np.array(paths),
                         sha256=np.array(sha256, dtype="S64"), copy_index=np.asarray(copy_index, np.int16))
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise storage_error(exc, tmp) from None
        # No fsync: a killed process loses nothing the page cache holds, and after a power cut a batch
        # that did not reach the disk fails to load in index() and is computed again.
        os.replace(tmp, self.folder / f"{batch_id}.npz")
        self._checked[self.folder / f"{batch_id}.npz"] = list(zip(paths, sha256, (int(k) for k in copy_index)))

    def index(self) -> dict[tuple[str, str, int], tuple[Path, int]]:
        """(path, sha256, copy_index) -> (batch file, row in it), for every finished batch.

        A batch that cannot be read whole (cut short by a power loss, damaged: bad CRC, garbage,
        inconsistent arrays) is deleted with a warning, so its rows are computed again.
        """
        found: dict[tuple[str, str, int], tuple[Path, int]] = {}
        if not self.folder.is_dir():
            return found
        for batch in sorted(self.folder.glob("[!.]*.npz")):
            if batch not in self._checked:
                try:
                    self._checked[batch] = _read_batch_keys(batch)
                except Exception as exc:  # EOFError, BadZipFile, bad CRC, ValueError, ...: recompute it
                    log.warning("Ignoring unreadable batch %s; its rows are computed again (%s)", batch.name,
                                str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                    with contextlib.suppress(OSError):  # a read-only folder: it is simply not used
                        batch.unlink()
                    continue
            for offset, key in enumerate(self._checked[batch]):
                found[key] = (batch, offset)
        return found

    def pending(self) -> list[Path]:
        """Finished batches not packed into a shard yet (those this process wrote or indexed)."""
        return list(self._checked)

    def pending_rows(self) -> int:
        return sum(len(keys) for keys in self._checked.values())

    def keys(self, batch: Path) -> list[tuple[str, str, int]]:
        return self._checked[batch]

    def discard(self, batches: list[Path]) -> None:
        """Delete batches whose rows are safely in a shard."""
        for batch in batches:
            self._checked.pop(batch, None)
            with contextlib.suppress(FileNotFoundError):
                batch.unlink()

    def discard_packed(self, in_shards: RowIndex) -> None:
        """Delete batches whose every row is already in a shard (a kill after the shard's rename)."""
        self.discard([b for b, keys in self._checked.items() if in_shards.contains(row_digests(keys)).all()])

    def digests(self) -> np.ndarray:
        """``row_digests`` of every row of the finished batches (those written or indexed)."""
        return row_digests([key for keys in self._checked.values() for key in keys])

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def save_weights(backbone, path: Path) -> None:
    """Save a backbone's weights (Keras ``.weights.h5``) under a temporary name, then rename.

    The space is reserved first with plain file I/O: when a write fails inside HDF5 (disk full, a
    file-size limit), h5py can crash the whole process instead of raising.

    Raises:
        StorageError: the folder cannot take the file.
    """
    tmp = path.with_name("tmp-" + path.name)
    variables = backbone.weights
    _reserve_space(path, sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)
                   + 4096 * len(variables) + 2**14)
    backbone.save_weights(str(tmp))
    os.replace(tmp, path)


def _reserve_space(path: Path, nbytes: int) -> None:
    """Raise StorageError naming ``path`` unless ``nbytes`` can be written beside it now (plain file I/O)."""
    reserve = path.with_name(f".reserve-{path.name}")
    try:
        fd = os.open(reserve, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise storage_error(exc, path) from None
    try:
        os.posix_fallocate(fd, 0, nbytes)  # checks free space and RLIMIT_FSIZE alike
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate: just try
            raise storage_error(exc, path) from None
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            reserve.unlink()


def _read_batch_keys(batch: Path) -> list[tuple[str, str, int]]:
    """The row keys of a batch file, after reading every array of it (which checks each CRC)."""
    with np.load(batch) as data:
        arrays = {name: data[name] for name in ("features", "pooled", "path", "sha256", "copy_index")}
    n = len(arrays["path"])
    if n == 0 or any(len(a) != n for a in arrays.values()) or arrays["features"].ndim != 4 \
            or arrays["pooled"].shape != (n, arrays["features"].shape[-1]):
        raise ValueError(f"inconsistent arrays {({k: a.shape for k, a in arrays.items()})}")
    return list(zip(arrays["path"].tolist(), arrays["sha256"].astype(str).tolist(),
                    (int(k) for k in arrays["copy_index"])))


class ReusableCache:
    """A complete cache of the same fingerprint: its rows are reused, its skipped files remembered.

    A plain cache's /features and /pooled are checked whole against its manifest first, as its rows are copied
    into shards. A master's are not read: the new master's checksums are made of the row digests its shards
    stored when they were written (``master``), so damage in a reused shard is found by whoever reads those rows
    (and by ``featcache verify``), never sealed in, and a rerun costs the new rows, not a read of the cache.
    """

    def __init__(self, handle):
        self.handle = handle
        split = read_checked(handle, "split")
        self.sharded = len(split) == 0 or handle["features"].is_virtual
        if not self.sharded:
            for name in ("features", "pooled"):  # verified whole: reused rows must not carry damage into shards
                check_dataset(handle, name, split)
        self._split = split
        self.n_rows = len(split)
        manifest = json.loads(handle.attrs["manifest"])
        self.skipped = {(s["path"], s["sha256"]): s for s in manifest.get("skipped", []) if s.get("sha256")}
        self.skipped_paths = {s["path"] for s in manifest.get("skipped", [])}
        self.shard_names = {Path(entry["file"]).name for entry in manifest.get("shards", [])}

    def row_keys(self) -> list[tuple[str, str, int]]:
        """(path, sha256, copy_index) of every row, in row order."""
        paths = read_checked(self.handle, "files/path").tolist()
        shas = read_checked(self.handle, "files/sha256").astype(str).tolist()
        source = read_checked(self.handle, "source_index", self._split)
        copy = read_checked(self.handle, "copy_index", self._split)
        return [(paths[s], shas[s], int(k)) for s, k in zip(source, copy)]

    def row_digests(self) -> np.ndarray:
        """``shards.row_digests`` of every row, in row order."""
        return row_digests(self.row_keys())

    def unpack(self, shards: ShardStore, shard_rows: int, compression: str | None) -> None:
        """Copy the rows of a plain (compacted or format-2) cache into shards, once, so a new master can map them."""
        keys = self.row_keys()
        for start in range(0, len(keys), shard_rows):
            stop = min(start + shard_rows, len(keys))
            features, pooled = self.handle["features"][start:stop], self.handle["pooled"][start:stop]
            shards.add(write_shard(shards.folder, shards.fingerprint, features, pooled, keys[start:stop],
                                   compression), keys[start:stop])

    @classmethod
    def open(cls, path: Path, fingerprint: str) -> "ReusableCache | None":
        if not path.exists():
            return None
        handle = open_cache(path)
        if handle.attrs["fingerprint"] != fingerprint:  # cannot happen: the name holds the fingerprint
            handle.close()
            raise FeatcacheError(f"{path} has fingerprint {handle.attrs['fingerprint']}, expected {fingerprint}.")
        try:
            return cls(handle)
        except BaseException:
            handle.close()
            raise

    def close(self) -> None:
        self.handle.close()


class ShardPacker:
    """Packs finished batches into shard files once ``shard_rows`` rows have gathered, then deletes the
    batches: the disk holds the shards plus at most one shard's worth of batches.

    Rows inside a shard are sorted by ``rank`` (their position in the cache), so a shard maps to few runs
    of master rows. Used from one thread at a time (extract's writer thread, then the main thread).

    A shard closes after ``shard_rows`` *planned* rows: the rows of files that failed to decode count too
    (``failed``, ``note_failed``), so the shards are those the Ray engine plans before anything is decoded
    (``ray_engine.plan_shards``), and a clean build gives the same shard files with either engine.
    """

    def __init__(self, store: BatchStore, shards: ShardStore, rank: np.ndarray, shard_rows: int,
                 compression: str | None = None):
        """``rank``: the ``row_digests`` of the cache's rows, in cache order (a row's rank is its position)."""
        self.store, self.shards = store, shards
        self._order = np.argsort(rank, kind="stable")
        self._sorted = rank[self._order]
        self.shard_rows, self.compression = shard_rows, compression
        self._failed = 0  # planned rows since the last shard whose files failed to decode

    def _ranks(self, keys: list) -> list[int]:
        """Each key's position in the cache (``len(rank)`` for a row that is not in it)."""
        digests, last = row_digests(keys), len(self._sorted)
        if not last:
            return [0] * len(keys)
        pos = np.minimum(np.searchsorted(self._sorted, digests), last - 1)
        return np.where(self._sorted[pos] == digests, self._order[pos], last).tolist()

    def write(self, batch_id: str, features: np.ndarray, pooled: np.ndarray, paths: list[str],
              sha256: list[str], copy_index: np.ndarray, failed: int = 0) -> None:
        """Keep one finished batch (``failed``: its planned rows that failed to decode); pack when a shard's
        worth of planned rows has gathered."""
        self.store.write(batch_id, features, pooled, paths, sha256, copy_index)
        self.note_failed(failed)

    def note_failed(self, rows: int) -> None:
        """Count ``rows`` planned rows that failed to decode (a batch with none left is never written)."""
        self._failed += rows
        if self.store.pending_rows() + self._failed >= self.shard_rows:
            self.pack()

    def pack(self) -> None:
        """Write every pending batch into one shard, then delete those batches."""
        self._failed = 0
        batches = self.store.pending()
        if not batches:
            return
        features, pooled, keys = [], [], []
        for batch in batches:
            with np.load(batch) as data:
                features.append(data["features"])
                pooled.append(data["pooled"])
            keys += self.store.keys(batch)
        ranks = self._ranks(keys)
        order = sorted(range(len(keys)), key=lambda i: (ranks[i], keys[i]))
        keys = [keys[i] for i in order]
        shard = write_shard(self.shards.folder, self.shards.fingerprint, np.concatenate(features)[order],
                            np.concatenate(pooled)[order], keys, self.compression)
        self.shards.add(shard, keys)
        self.store.discard(batches)


@dataclass
class CacheRows:
    """The rows of a cache, as arrays over its files: row ``i`` is copy ``copy[i]`` (0 the original, 1..K
    augmented) of ``files[file[i]]`` (a ``SourceFile``); ``digests[i]`` is its ``row_digests`` key. The rows
    of one file are adjacent, files in the order given. A million rows hold 22 MB here, not a list of tuples."""

    files: list
    file: np.ndarray  # (n,) int32
    copy: np.ndarray  # (n,) int16
    digests: np.ndarray  # (n,) S16

    @classmethod
    def plan(cls, files: list, train_copies: int) -> "CacheRows":
        """Every file's original, and ``train_copies`` augmented copies of each train file."""
        counts = np.array([train_copies + 1 if f.record.split == "train" else 1 for f in files], np.int64)
        file = np.repeat(np.arange(len(files), dtype=np.int32), counts)
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        copy = (np.arange(len(file)) - starts).astype(np.int16)
        digests = row_digests((files[i].record.path, files[i].sha256, k) for i, k in zip(file.tolist(), copy.tolist()))
        return cls(list(files), file, copy, digests)

    def __len__(self) -> int:
        return len(self.file)

    def select(self, mask: np.ndarray) -> "CacheRows":
        return CacheRows(self.files, self.file[mask], self.copy[mask], self.digests[mask])

    def pairs(self) -> list[tuple]:
        """``(SourceFile, copy_index)`` per row: for the rows to compute only."""
        return [(self.files[i], k) for i, k in zip(self.file.tolist(), self.copy.tolist())]

    def counts(self) -> dict[str, int]:
        """Original files per split, augmented copies, rows."""
        originals = self.file[self.copy == 0]
        splits = np.array([self.files[i].record.split for i in originals.tolist()], dtype=object)
        return {**{split: int((splits == split).sum()) for split in SPLIT_CODES},
                "train_copies": int((self.copy > 0).sum()), "rows": len(self)}


def assemble_cache(paths: CachePaths, rows: CacheRows, shards: ShardStore, manifest: dict, weights_from: Path,
                   targets: dict[str, tuple[float, ...]] | None = None) -> int:
    """Write the master file over the shards that hold ``rows``, then rename it into place; returns the number
    of runs of rows its virtual datasets map (``cache.compact_hint``).

    Args:
        paths: where the cache goes.
        rows: the rows in final row order; every row is in a shard.
        shards: the shard store (already indexed).
        manifest: embedded in the file.
        weights_from: saved random weights to move beside the cache first, if that file exists.
        targets: a multi-label cache's relative path -> (k,) 0/1 targets, NaN masked; written as /targets, each
            row carrying its file's. None: no /targets (binary and multi-class caches).
    """
    used = np.unique(rows.file)  # the files with rows, in the given order
    files = [rows.files[i] for i in used.tolist()]
    position = np.searchsorted(used, rows.file)
    table = FileTable(
        path=[f.record.path for f in files], sha256=[f.sha256 for f in files],
        label=np.array([f.record.label for f in files], np.int16),
        split=np.array([SPLIT_CODES[f.record.split] for f in files], np.uint8),
        patient=[f.record.patient for f in files],
    )
    shard_files, number, offset = shards.index().locate(rows.digests)
    columns = {"labels": table.label[position], "split": table.split[position],
               "source_index": position, "copy_index": rows.copy}
    if targets is not None:
        per_file = np.array([targets[f.record.path] for f in files], np.float32).reshape(len(files), -1)
        columns["targets"] = per_file[position]
    if weights_from.exists():
        os.replace(weights_from, paths.weights)  # before the cache: a whole cache always has its weights
    return write_master(paths.final, shard_files, list(zip(number.tolist(), offset.tolist())), table, columns, manifest)
