"""The binary file of the hash cache (``hashcache``): per data folder, arrays of stat keys, SHA-256s and paths.

Layout (little-endian)::

    magic    8 bytes   b"FCHASH\\x00\\x02"
    length   8 bytes   uint64: bytes of the header
    seal    32 bytes   SHA-256 of everything after it (header and body)
    header           JSON: {"format", "version", "roots": [{"root", "count", "paths"}]}
    body             per root, in header order: count stat keys (KEY_DTYPE, 40 B each), count raw SHA-256s
                     (32 B each), then ``paths`` bytes of the relative paths, UTF-8, NUL-separated

About 100 B per file, read with one ``read`` and ``numpy.frombuffer`` instead of parsing 160 B of JSON per file.
The seal covers every byte, so a torn, edited or foreign file is refused as a whole (``HashFileError``) and the
caller hashes every file again: a damaged file can cost time, never give a wrong hash. NUL cannot occur in a
POSIX file name, so it separates paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"FCHASH\x00\x02"
FORMAT = "featcache-hashes"
VERSION = 2
KEY_DTYPE = np.dtype([("size", "<i8"), ("mtime_ns", "<i8"), ("ctime_ns", "<i8"), ("inode", "<u8"),
                      ("device", "<u8")])
DIGEST_BYTES = 32
_PREFIX = len(MAGIC) + 8 + DIGEST_BYTES


class HashFileError(ValueError):
    """The file is not a whole, unedited hash file of this version (internal: the caller rehashes)."""


@dataclass
class RootEntries:
    """The remembered files of one data folder: ``keys`` (n,) KEY_DTYPE, ``digests`` (n, 32) uint8 raw SHA-256s,
    ``paths`` the n relative paths."""

    keys: np.ndarray
    digests: np.ndarray
    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def read_hash_file(path: Path) -> dict[str, RootEntries]:
    """Data folder -> its entries.

    Raises:
        FileNotFoundError: no file.
        OSError: it cannot be read.
        HashFileError: anything else wrong with it.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    if len(data) < _PREFIX or data[:len(MAGIC)] != MAGIC:
        raise HashFileError("not a featcache hash file of version 2")
    length = int.from_bytes(data[len(MAGIC):len(MAGIC) + 8], "little")
    if hashlib.sha256(memoryview(data)[_PREFIX:]).digest() != data[len(MAGIC) + 8:_PREFIX]:
        raise HashFileError("its SHA-256 does not match its content (torn or edited)")
    try:
        header = json.loads(data[_PREFIX:_PREFIX + length])
        roots = header["roots"]
        if header["format"] != FORMAT or header["version"] != VERSION or not isinstance(roots, list):
            raise HashFileError("not a featcache hash file of version 2")
        spans = [(str(r["root"]), int(r["count"]), int(r["paths"])) for r in roots]
    except (ValueError, KeyError, TypeError) as exc:
        raise HashFileError(f"bad header ({exc})") from None
    out, at = {}, _PREFIX + length
    for root, count, nbytes in spans:
        end = at + count * (KEY_DTYPE.itemsize + DIGEST_BYTES) + nbytes
        if count < 0 or nbytes < 0 or end > len(data) or (count == 0 and nbytes):
            raise HashFileError("shorter than its header says")
        keys = np.frombuffer(data, KEY_DTYPE, count, at)
        at += count * KEY_DTYPE.itemsize
        digests = np.frombuffer(data, np.uint8, count * DIGEST_BYTES, at).reshape(count, DIGEST_BYTES)
        at += count * DIGEST_BYTES
        paths = data[at:at + nbytes].decode("utf-8", "surrogatepass").split("\0") if count else []
        at += nbytes
        if len(paths) != count:
            raise HashFileError(f"{len(paths)} paths for {count} entries")
        out[root] = RootEntries(keys, digests, paths)
    if at != len(data):
        raise HashFileError("longer than its header says")
    return out


def write_hash_file(path: Path, roots: dict[str, RootEntries]) -> None:
    """Write atomically: a unique temporary name, then rename (of two writers the last one wins; a kill leaves
    the old file or the new one, and a torn temporary is never read).

    Raises:
        OSError: it cannot be written (the temporary file is removed).
    """
    blobs = {root: "\0".join(e.paths).encode("utf-8", "surrogatepass") for root, e in roots.items()}
    header = json.dumps({"format": FORMAT, "version": VERSION,
                         "roots": [{"root": root, "count": len(e), "paths": len(blobs[root])}
                                   for root, e in roots.items()]}, separators=(",", ":")).encode()
    body = [header]
    for root, entries in roots.items():
        body += [np.ascontiguousarray(entries.keys, KEY_DTYPE).tobytes(),
                 np.ascontiguousarray(entries.digests, np.uint8).tobytes(), blobs[root]]
    seal = hashlib.sha256()
    for part in body:
        seal.update(part)
    replace_file(path, [MAGIC + len(header).to_bytes(8, "little") + seal.digest(), *body])


def replace_file(path: Path, parts: list[bytes]) -> None:
    """Write ``parts`` to ``path`` through a unique temporary name, then rename: of two writers the last one wins,
    a kill leaves the old file or the new one. Not synced: for files that are optimisations only.

    Raises:
        OSError: it cannot be written (the temporary file is removed).
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{time.time_ns()}.incomplete")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            for part in parts:
                handle.write(part)
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
