"""Stat-keyed SHA-256 cache of the data folder's files, so that ``extract`` re-reads only changed files.

One file per cache folder, ``<cache-dir>/.hashes.json``: for each data folder (its resolved path), each
file's hash keyed by (relative path, size, mtime_ns, ctime_ns, inode, device). A hash is reused only when
the whole key matches. ctime cannot be set by users (``touch``/``utime`` set mtime only, and any write or
rename updates ctime), so a changed content changes the key even when the size and mtime are put back.
Trade-off: a file whose content changes within the filesystem's timestamp tick after it was hashed could
keep its key; so files changed less than ``RACY_SECONDS`` before the hashing began are never remembered
(git's "racy clean" rule), and are hashed again next time.

The file is an optimisation only: a damaged or foreign one is ignored (one log line) and rebuilt, and
failing to write it (read-only folder, disk full, a second writer) is a debug log, never an error.
Writes are atomic (a unique temporary name, then rename): of two writers, the last one wins.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

HASHES_FILE = ".hashes.json"
FORMAT = "featcache-hashes"
VERSION = 1
RACY_SECONDS = 2.0


def stat_key(path: str | Path) -> tuple[int, int, int, int, int]:
    """(size, mtime_ns, ctime_ns, inode, device) of the file ``path`` names (links followed, as reads do).

    Raises:
        OSError: the file cannot be stat'ed.
    """
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev


class HashCache:
    """Hashes remembered for one data folder: ``get`` by relative path and stat key; ``reuse`` (``get``, and
    keep a hit for the next run) and ``put`` (a fresh hash); ``save`` once."""

    def __init__(self, cache_dir: str | Path, data_root: str | Path):
        self.path = Path(cache_dir) / HASHES_FILE
        self.root = str(Path(data_root).resolve())
        self.started_ns = time.time_ns()
        self._others: dict[str, dict] = {}  # other data folders' entries, written back untouched
        self._old: dict[str, list] = {}
        self._new: dict[str, list] = {}
        self._load()

    def _load(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as handle:
                record = json.load(handle)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.info("ignoring the hash cache %s (%s); all files are hashed again", self.path, exc)
            return
        if not isinstance(record, dict):
            record = {}
        roots = record.get("roots")
        if record.get("format") != FORMAT or record.get("version") != VERSION or not isinstance(roots, dict) \
                or not all(isinstance(v, dict) for v in roots.values()):
            log.info("ignoring the hash cache %s (not a featcache hash cache of version %d); all files are hashed "
                     "again", self.path, VERSION)
            return
        self._others = {root: entries for root, entries in roots.items() if root != self.root}
        self._old = roots.get(self.root, {})  # entries are checked when used

    def get(self, relative: str, key: tuple) -> str | None:
        """The remembered hash of ``relative`` if its whole stat key matches, else None (reads only: safe from
        several threads)."""
        entry = self._old.get(relative)
        if type(entry) is list and len(entry) == 6 and tuple(entry[:5]) == key and _is_sha256(entry[5]):
            return entry[5]
        return None

    def reuse(self, relative: str, key: tuple) -> str | None:
        """``get``, and keep a hit for the next run (its entry object reused: a rerun of 100,000 files builds no
        new lists)."""
        entry = self._old.get(relative)
        if type(entry) is list and len(entry) == 6 and tuple(entry[:5]) == key and _is_sha256(entry[5]):
            self._new[relative] = entry
            return entry[5]
        return None

    def put(self, relative: str, key: tuple, sha256: str) -> None:
        """Remember a hash computed from the file's content read after ``key`` was taken."""
        if key[2] < self.started_ns - RACY_SECONDS * 1e9 and key[1] < self.started_ns - RACY_SECONDS * 1e9:
            self._new[relative] = [*key, sha256]

    def save(self) -> None:
        """Write the entries of this run (files gone since are dropped); failures are a debug log only."""
        if self._new == self._old:
            return  # nothing changed: no write (a read-only cache folder costs nothing)
        record = {"format": FORMAT, "version": VERSION,
                  "roots": {**self._others, self.root: dict(sorted(self._new.items()))}}
        write_optional_json(self.path, record, "the hash cache", "the next run hashes every file")


def write_optional_json(path: Path, record: dict, what: str, consequence: str) -> None:
    """Write a JSON file that is an optimisation only (the hash cache, the weights-hash memo): atomically (a unique
    temporary name, then rename: of two writers the last one wins), and a failure is a debug log, never an error."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{time.time_ns()}.incomplete")
    try:
        text = json.dumps(record, separators=(",", ":"))  # one call of the C encoder (json.dump's is Python's)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("could not write %s %s (%s); %s", what, path, exc, consequence)
        try:
            tmp.unlink()
        except OSError:
            pass


def _is_sha256(value) -> bool:
    return type(value) is str and len(value) == 64
