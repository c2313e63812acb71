"""Work in progress of one cache: finished batches, reusable rows of an older cache, and the assembly.

Each finished extraction batch is one ``.npz`` in ``<name>.partial/``, written under a temporary
name and renamed, so a killed run loses at most the batches in flight. When every row exists,
``assemble_cache`` writes the complete cache through ``CacheWriter`` (which renames it into place).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from featcache.cache import CachePaths, CacheWriter, FileTable, open_cache, read_rows
from featcache.checksums import check_dataset, read_checked
from featcache.data import SPLIT_CODES
from featcache.errors import FeatcacheError, storage_error

log = logging.getLogger(__name__)

ASSEMBLE_ROWS = 256  # rows copied per step when the cache file is assembled
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
    """A complete cache of the same fingerprint, whose rows can be reused."""

    def __init__(self, handle):
        self.handle = handle
        split = read_checked(handle, "split")
        for name in ("features", "pooled"):  # verified whole: reused rows must not carry damage into a new cache
            check_dataset(handle, name, split)
        paths = read_checked(handle, "files/path").tolist()
        shas = read_checked(handle, "files/sha256").astype(str).tolist()
        source, copy = read_checked(handle, "source_index", split), read_checked(handle, "copy_index", split)
        self.index = {(paths[s], shas[s], int(k)): ("old", i) for i, (s, k) in enumerate(zip(source, copy))}
        self.n_rows = len(source)
        manifest = json.loads(handle.attrs["manifest"])
        self.skipped = {(s["path"], s["sha256"]): s for s in manifest.get("skipped", []) if s.get("sha256")}
        self.skipped_paths = {s["path"] for s in manifest.get("skipped", [])}

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


def assemble_cache(paths: CachePaths, rows: list, old: "ReusableCache | None", store: BatchStore, manifest: dict,
                   config) -> None:
    """Write the complete cache from reusable old rows and finished batches, then rename it into place.

    Args:
        paths: where the cache goes.
        rows: ``(SourceFile, copy_index)`` in final row order.
        old: an older complete cache of the same fingerprint, or None.
        store: the finished batches.
        manifest: embedded in the file.
        config: the ExtractConfig (dtype, compression).
    """
    files = list({f.record.path: f for f, _ in rows}.values())
    position = {f.record.path: i for i, f in enumerate(files)}
    table = FileTable(
        path=[f.record.path for f in files], sha256=[f.sha256 for f in files],
        label=np.array([f.record.label for f in files]), split=np.array([SPLIT_CODES[f.record.split] for f in files]),
        patient=[f.record.patient for f in files],
    )
    available = {**(old.index if old else {}), **store.index()}
    writer = CacheWriter(paths.final, table, len(rows), tuple(manifest["feature_shape"]), config.dtype,
                         config.compression)
    loaded: dict[Path, dict] = {}
    try:
        for start in range(0, len(rows), ASSEMBLE_ROWS):
            chunk = rows[start:start + ASSEMBLE_ROWS]
            sources = [available[(f.record.path, f.sha256, k)] for f, k in chunk]
            features, pooled = _gather(sources, old, loaded)
            writer.write_rows(
                start, features, pooled,
                labels=np.array([f.record.label for f, _ in chunk]),
                split=np.array([SPLIT_CODES[f.record.split] for f, _ in chunk]),
                source_index=np.array([position[f.record.path] for f, _ in chunk]),
                copy_index=np.array([k for _, k in chunk]),
            )
        saved_weights = store.folder / SAVED_WEIGHTS
        if saved_weights.exists():
            os.replace(saved_weights, paths.weights)  # before the cache: a whole cache always has its weights
        writer.commit(manifest)
    except BaseException:
        writer.abort()
        raise


def _gather(sources: list, old: "ReusableCache | None", loaded: dict) -> tuple[np.ndarray, np.ndarray]:
    """Features and pooled rows from ("old", row) or (batch file, offset) sources, in order."""
    features, pooled = [], []
    old_rows = [row for kind, row in sources if kind == "old"]
    if old_rows:
        old_features = read_rows(old.handle["features"], np.array(old_rows))
        old_pooled = read_rows(old.handle["pooled"], np.array(old_rows))
    taken = 0
    for kind, row in sources:
        if kind == "old":
            features.append(old_features[taken])
            pooled.append(old_pooled[taken])
            taken += 1
            continue
        if kind not in loaded:
            if len(loaded) >= 4:
                loaded.pop(next(iter(loaded)))
            with np.load(kind) as data:
                loaded[kind] = {"features": data["features"], "pooled": data["pooled"]}
        features.append(loaded[kind]["features"][row])
        pooled.append(loaded[kind]["pooled"][row])
    return np.stack(features), np.stack(pooled)
