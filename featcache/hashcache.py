"""Stat-keyed SHA-256 cache of the data folder's files, so that ``extract`` re-reads only changed files.

One file per cache folder, ``<cache-dir>/.hashes.bin`` (``hashfile``: arrays, sealed by a SHA-256): for each data
folder (its resolved path), each file's hash keyed by (relative path, size, mtime_ns, ctime_ns, inode, device).
A hash is reused only when the whole key matches. ctime cannot be set by users (``touch``/``utime`` set mtime only, and any write or
rename updates ctime), so a changed content changes the key even when the size and mtime are put back.
Trade-off: a file whose content changes within the filesystem's timestamp tick after it was hashed could
keep its key; so files changed less than ``RACY_SECONDS`` before the hashing began are never remembered
(git's "racy clean" rule), and are hashed again next time.

The file is an optimisation only: a damaged or foreign one is ignored (one log line) and rebuilt, and
failing to write it (read-only folder, disk full, a second writer) is a debug log, never an error.
Writes are atomic (a unique temporary name, then rename): of two writers, the last one wins. It is written only
when an entry changed. The JSON file of earlier versions (``.hashes.json``) is read when there is no binary one,
and replaced by it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from featcache.hashfile import (
    DIGEST_BYTES, KEY_DTYPE, HashFileError, RootEntries, read_hash_file, replace_file, write_hash_file,
)

log = logging.getLogger(__name__)

HASHES_FILE = ".hashes.bin"  # hashfile's binary layout
LEGACY_FILE = ".hashes.json"  # version 1 (JSON, ~160 B a file): read once, rewritten as HASHES_FILE, deleted
FORMAT = "featcache-hashes"
LEGACY_VERSION = 1
RACY_SECONDS = 2.0


def stat_key(path: str | Path) -> tuple[int, int, int, int, int]:
    """(size, mtime_ns, ctime_ns, inode, device) of the file ``path`` names (links followed, as reads do).

    Raises:
        OSError: the file cannot be stat'ed.
    """
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev


def stat_keys(prefix: str, paths: list[str]) -> list:
    """``stat_key(prefix + path)`` of each path, or the OSError that stopped it, in order (one loop, no call per
    file: 100,000 files cost their ``stat`` calls and little more)."""
    keys: list = []
    append, stat = keys.append, os.stat
    for path in paths:
        try:
            info = stat(prefix + path)
        except OSError as exc:
            append(exc)
            continue
        append((info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev))
    return keys


class HashCache:
    """Hashes remembered for one data folder: ``reuse_all`` (the remembered hashes of files whose whole stat key
    matches, kept for the next run), ``put`` (a fresh hash), then ``save`` once."""

    def __init__(self, cache_dir: str | Path, data_root: str | Path):
        self.path = Path(cache_dir) / HASHES_FILE
        self.legacy = Path(cache_dir) / LEGACY_FILE
        self.root = str(Path(data_root).resolve())
        self.started_ns = time.time_ns()
        self._others: dict[str, RootEntries] = {}  # other data folders' entries, written back untouched
        self._old = _empty()
        self._migrate = False  # entries came from LEGACY_FILE: write HASHES_FILE even if nothing changed
        self._hits = np.empty(0, np.int64)  # entries of _old reused by this run
        self._new: list[tuple[str, tuple, str]] = []  # (relative path, stat key, hex SHA-256) hashed by this run
        self._load()

    def _load(self) -> None:
        try:
            roots = read_hash_file(self.path)
        except FileNotFoundError:
            roots = _read_legacy(self.legacy)
            self._migrate = self.legacy.exists()
        except (OSError, HashFileError) as exc:
            log.info("ignoring the hash cache %s (%s); all files are hashed again", self.path, exc)
            return
        self._others = {root: entries for root, entries in roots.items() if root != self.root}
        self._old = roots.get(self.root, _empty())

    def reuse_all(self, paths: list[str], keys: list) -> list[str | None]:
        """The remembered hex SHA-256 of each ``paths[i]`` whose whole stat key ``keys[i]`` matches, else None (also
        for a key that is None or not a tuple); the hits are kept for the next run. Call once per run."""
        out: list[str | None] = [None] * len(paths)
        old = self._old
        if not len(old) or not paths:
            return out
        index = dict(zip(old.paths, range(len(old))))
        found = np.fromiter((index.get(p, -1) if type(k) is tuple else -1 for p, k in zip(paths, keys)),
                            np.int64, len(paths))
        rows = np.flatnonzero(found >= 0)
        now, valid = _key_array([keys[i] for i in rows.tolist()])
        match = valid & (old.keys[found[rows]] == now)
        rows, hits = rows[match], found[rows][match]
        self._hits = hits
        text = old.digests[hits].tobytes().hex()
        width = 2 * DIGEST_BYTES
        for j, i in enumerate(rows.tolist()):
            out[i] = text[j * width:(j + 1) * width]
        return out

    def put(self, relative: str, key: tuple, sha256: str) -> None:
        """Remember a hash computed from the file's content read after ``key`` was taken."""
        if key[2] < self.started_ns - RACY_SECONDS * 1e9 and key[1] < self.started_ns - RACY_SECONDS * 1e9:
            self._new.append((relative, key, sha256))

    def save(self) -> None:
        """Write the entries of this run (files gone since are dropped); failures are a debug log only."""
        if not self._new and len(self._hits) == len(self._old) and not self._migrate:
            return  # nothing changed: no write (a read-only cache folder costs nothing)
        keys, valid = _key_array([key for _, key, _ in self._new])
        fresh = [entry for entry, ok in zip(self._new, valid.tolist()) if ok]
        hits = self._hits
        entries = RootEntries(
            keys=np.concatenate([self._old.keys[hits], keys[valid]]),
            digests=np.concatenate([self._old.digests[hits],
                                    np.frombuffer(bytes.fromhex("".join(d for _, _, d in fresh)), np.uint8
                                                  ).reshape(-1, DIGEST_BYTES)]),
            paths=[self._old.paths[i] for i in hits.tolist()] + [p for p, _, _ in fresh],
        )
        try:
            write_hash_file(self.path, {**self._others, self.root: entries})
        except OSError as exc:
            log.debug("could not write the hash cache %s (%s); the next run hashes every file", self.path, exc)
            return
        if self._migrate:
            try:
                self.legacy.unlink()
            except OSError as exc:
                log.debug("could not delete the old hash cache %s (%s)", self.legacy, exc)


def _empty() -> RootEntries:
    return RootEntries(np.empty(0, KEY_DTYPE), np.empty((0, DIGEST_BYTES), np.uint8), [])


def _key_array(keys: list) -> tuple[np.ndarray, np.ndarray]:
    """(n,) KEY_DTYPE of stat-key tuples, and which of them fit it (a value out of its range, e.g. an inode of a
    filesystem beyond 64 bits, or anything not a 5-tuple of ints, is never remembered nor matched)."""
    try:
        return np.array(keys, KEY_DTYPE).reshape(-1), np.ones(len(keys), bool)
    except (OverflowError, TypeError, ValueError):
        out, valid = np.zeros(len(keys), KEY_DTYPE), np.zeros(len(keys), bool)
        for i, key in enumerate(keys):
            if type(key) is tuple and len(key) == 5 and all(type(v) is int for v in key):
                try:
                    out[i] = key
                    valid[i] = True
                except (OverflowError, ValueError):
                    pass
        return out, valid


def _read_legacy(path: Path) -> dict[str, RootEntries]:
    """The entries of a version-1 JSON hash cache (``LEGACY_FILE``), each checked; {} for none or a bad file."""
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.info("ignoring the hash cache %s (%s); all files are hashed again", path, exc)
        return {}
    roots = record.get("roots") if isinstance(record, dict) else None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != LEGACY_VERSION \
            or not isinstance(roots, dict) or not all(isinstance(v, dict) for v in roots.values()):
        log.info("ignoring the hash cache %s (not a featcache hash cache of version %d); all files are hashed "
                 "again", path, LEGACY_VERSION)
        return {}
    return {root: _legacy_entries(entries) for root, entries in roots.items()}


def _legacy_entries(entries: dict) -> RootEntries:
    paths, keys, digests = [], [], []
    for relative, entry in entries.items():
        if type(entry) is list and len(entry) == 6 and _is_sha256(entry[5]):
            paths.append(relative)
            keys.append(tuple(entry[:5]))
            digests.append(bytes.fromhex(entry[5]))
    array, valid = _key_array(keys)
    keep = valid.tolist()
    return RootEntries(array[valid],
                       np.frombuffer(b"".join(d for d, ok in zip(digests, keep) if ok), np.uint8
                                     ).reshape(-1, DIGEST_BYTES),
                       [p for p, ok in zip(paths, keep) if ok])


def write_optional_json(path: Path, record: dict, what: str, consequence: str) -> None:
    """Write a JSON file that is an optimisation only (the hash cache, the weights-hash memo): atomically (a unique
    temporary name, then rename: of two writers the last one wins), and a failure is a debug log, never an error."""
    text = json.dumps(record, separators=(",", ":"))  # one call of the C encoder (json.dump's is Python's)
    try:
        replace_file(path, [text.encode("utf-8")])
    except OSError as exc:
        log.debug("could not write %s %s (%s); %s", what, path, exc, consequence)


def _is_sha256(value) -> bool:
    if type(value) is not str or len(value) != 64:
        return False
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True
