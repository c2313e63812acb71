"""The write side of the HDF5 cache (layout: ``featcache.cache``): the writers' lock, atomic HDF5 files (shards
and masters) and ``CacheWriter``, which writes one complete plain cache file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from featcache.cache import FORMAT_VERSION, INCOMPLETE_SUFFIX, POOLED_CHUNK_ROWS, text_sha256
from featcache.checksums import BY_ROW, Digests, dataset_records
from featcache.errors import CacheLockedError, storage_error

ROW_FIELDS = ("labels", "split", "source_index", "copy_index")
ROW_DTYPES = {"labels": np.int16, "split": np.uint8, "source_index": np.int32, "copy_index": np.int16,
              "targets": np.float32}
STR = h5py.string_dtype("utf-8")


class CacheLock:
    """An exclusive, non-blocking flock; the kernel drops it when its process dies, even by SIGKILL."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> "CacheLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a read-only folder: an existing lock file still locks (flock needs no write)
            if exc.errno not in (errno.EACCES, errno.EROFS, errno.EPERM) or not self.path.is_file():
                raise
            fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise CacheLockedError(
                    f"Another featcache process is writing {self.path.parent} ({self.path.name} is locked); "
                    "wait for it to finish or use another --cache-dir."
                ) from None
            raise
        with contextlib.suppress(OSError):  # the pid is for people; a read-only lock file locks as well
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class FileTable:
    """Per-file columns, in row order of /files."""

    path: list[str]
    sha256: list[str]
    label: np.ndarray
    split: np.ndarray
    patient: list[str]

    def __len__(self) -> int:
        return len(self.path)


def chunk_rows(feature_shape: tuple[int, ...], dtype: str) -> int:
    """Rows per HDF5 chunk: about 1 MiB, good for sequential reads."""
    row_bytes = int(np.prod(feature_shape)) * np.dtype(dtype).itemsize
    return int(max(1, min(256, 2**20 // row_bytes)))


class _WriteGuard:
    """The file object HDF5 writes through. A failed write (disk full, file-size limit) is recorded and
    the rest are dropped, instead of reaching HDF5: h5py can crash the process when it closes a file
    whose writes failed. The writer checks ``error`` and deletes the file."""

    def __init__(self, raw):
        self.raw = raw
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        while self.error is None and len(view):
            try:
                view = view[self.raw.write(view):]  # unbuffered: a short write is followed by one that fails
            except OSError as exc:
                self.error = exc
        return size

    def truncate(self, size=None):
        if self.error is None:
            try:
                return self.raw.truncate(size)
            except OSError as exc:
                self.error = exc
        return size

    def flush(self) -> None:
        pass  # unbuffered

    def __getattr__(self, name):  # read, seek, tell
        return getattr(self.raw, name)


@contextlib.contextmanager
def atomic_h5(final: Path):
    """An HDF5 file written under ``<final>.incomplete`` through the write guard, then fsynced and renamed to
    ``final`` (and its folder fsynced) when the block ends; on any error the temporary file is deleted, and an
    OSError (disk full, file-size limit, ...) becomes one StorageError line. Used by the shards and the master.

    Yields:
        the open, writable h5py.File.
    """
    final = Path(final)
    tmp = final.with_name(final.name + INCOMPLETE_SUFFIX)
    raw = _create(tmp)
    guard = _WriteGuard(raw)
    try:
        with h5py.File(guard, "w") as handle:
            yield handle
        if guard.error is not None:
            raise guard.error
        os.fsync(raw.fileno())
        raw.close()
        os.replace(tmp, final)
        _fsync(final.parent)
    except OSError as exc:
        _discard(raw, tmp)
        raise storage_error(exc, tmp) from None
    except BaseException:
        _discard(raw, tmp)
        raise


def _create(tmp: Path):
    """``tmp`` opened for writing, unbuffered; an OSError is one StorageError line."""
    try:
        return open(tmp, "w+b", buffering=0)
    except OSError as exc:
        raise storage_error(exc, tmp) from None


def _discard(raw, tmp: Path) -> None:
    with contextlib.suppress(OSError):
        raw.close()
    tmp.unlink(missing_ok=True)


class CacheWriter:
    """Writes one complete cache file: everything goes to ``<final>.incomplete`` until ``commit``.

    Rows are written in order; the SHA-256 of every dataset is computed from the very bytes written and
    recorded in the manifest (``manifest["datasets"]``). Chunked datasets also carry HDF5's fletcher32
    checksum, so a rotten chunk fails when it is read.

    Raises:
        StorageError: the file cannot be written (it is deleted; the caller's work files are kept).
    """

    def __init__(self, final_path: Path, files: FileTable, n_rows: int, feature_shape: tuple[int, int, int],
                 dtype: str = "float16", compression: str | None = None, targets: int | None = None):
        self.final_path = Path(final_path)
        self.tmp_path = self.final_path.with_name(self.final_path.name + INCOMPLETE_SUFFIX)
        try:
            self.final_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(exc, self.final_path.parent) from None
        self._raw = _create(self.tmp_path)
        self._guard = _WriteGuard(self._raw)
        self._file = None
        try:
            self._file = h5py.File(self._guard, "w")
            self._layout(files, n_rows, feature_shape, dtype, compression, targets)
        except BaseException as exc:  # nothing half-made is left behind
            self.abort()
            if isinstance(exc, OSError):
                raise storage_error(self._guard.error or exc, self.tmp_path) from None
            raise
        self.n_rows = n_rows

    def _layout(self, files: FileTable, n_rows: int, feature_shape: tuple, dtype: str, compression: str | None,
                targets: int | None) -> None:
        """Create every dataset (rows to come) and write the per-file table."""
        self._file.attrs["complete"] = False
        self._digests = Digests(by_row=BY_ROW)
        self._next_row = 0
        rows, one = chunk_rows(feature_shape, dtype), max(n_rows, 1)
        self._file.create_dataset("features", (n_rows, *feature_shape), dtype=dtype, fletcher32=True,
                                  chunks=(min(rows, one), *feature_shape), compression=compression)
        self._file.create_dataset("pooled", (n_rows, feature_shape[-1]), dtype="float32", fletcher32=True,
                                  chunks=(min(POOLED_CHUNK_ROWS, one), feature_shape[-1]), compression=compression)
        for name in ROW_FIELDS:
            self._file.create_dataset(name, (n_rows,), dtype=ROW_DTYPES[name], chunks=(min(2**16, one),),
                                      fletcher32=True)
        self._fields = ROW_FIELDS if targets is None else (*ROW_FIELDS, "targets")
        if targets is not None:  # a multi-label cache: (n, k) targets
            self._file.create_dataset("targets", (n_rows, targets), dtype=np.float32, chunks=(min(2**16, one), targets),
                                      fletcher32=True)
        columns = {"path": np.array(files.path, dtype=object), "sha256": np.array(files.sha256, dtype="S64"),
                   "label": np.asarray(files.label, dtype=np.int16), "split": np.asarray(files.split, dtype=np.uint8),
                   "patient": np.array(files.patient, dtype=object)}
        group = self._file.create_group("files")
        for name, values in columns.items():
            group.create_dataset(name, data=values, dtype=STR if values.dtype == object else values.dtype)
            self._digests.update(f"files/{name}", values)

    def write_rows(self, start: int, features: np.ndarray, pooled: np.ndarray, **columns: np.ndarray) -> None:
        """Write rows ``start : start + len(features)``, in order; ``columns`` are the ROW_FIELDS (and ``targets``
        when the writer was made with ``targets``)."""
        if start != self._next_row:
            raise RuntimeError(f"CacheWriter writes rows in order: expected start={self._next_row}, got {start}")
        stop = start + len(features)
        values = {"features": np.asarray(features, self._file["features"].dtype),
                  "pooled": np.asarray(pooled, np.float32),
                  **{name: np.asarray(columns[name], ROW_DTYPES[name]) for name in self._fields}}
        for name, array in values.items():  # converted first, so the digest covers exactly the stored bytes
            self._file[name][start:stop] = array
            self._digests.update(name, array, values["split"])
        self._next_row = stop
        self._check()

    def _check(self) -> None:
        if self._guard.error is not None:
            raise storage_error(self._guard.error, self.tmp_path)

    def commit(self, manifest: dict) -> Path:
        """Embed the manifest (with the datasets' checksums), mark complete, then rename into place (atomic)."""
        if self._next_row != self.n_rows:
            raise RuntimeError(f"CacheWriter.commit after {self._next_row} of {self.n_rows} rows")
        manifest = {**manifest, "datasets": dataset_records(self._file, self._digests)}
        text = json.dumps(manifest, sort_keys=True, default=str)
        self._file.attrs["manifest"] = text
        self._file.attrs["manifest_sha256"] = text_sha256(text)  # the manifest holds the digests: seal it too
        self._file.attrs["format_version"] = FORMAT_VERSION
        self._file.attrs["fingerprint"] = manifest["fingerprint"]
        self._file.attrs["complete"] = True
        self._file.close()
        self._check()
        try:
            os.fsync(self._raw.fileno())  # a failed fsync does not name its file
        except OSError as exc:
            raise storage_error(exc, self.tmp_path) from None
        self._raw.close()
        os.replace(self.tmp_path, self.final_path)
        _fsync(self.final_path.parent)
        return self.final_path

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # the error being handled is the one to report
            if self._file is not None and self._file.id.valid:
                self._file.close()
        with contextlib.suppress(OSError):
            self._raw.close()
        self.tmp_path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # name the file: a failed fsync does not
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        os.close(fd)
