"""Which rows of a cache an ``extract`` run wants, and whether a complete cache already holds all of them.

``plan_rows`` is the matching that every run does; ``nothing_to_do`` is the early exit of a rerun on
unchanged data, which needs no backbone (so no TensorFlow): the fingerprint comes from a remembered
weights hash (``weightsmemo``), the complete cache of that fingerprint is opened and checked exactly as
the full path does (``ReusableCache``), and every wanted row must be in it. Anything else (no cache,
rows to compute, a failed check, work in progress of a killed run, a lock held by another writer, saved
random weights gone) returns None, and extract takes its full path.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from featcache.cache import INCOMPLETE_SUFFIX, CachePaths
from featcache.cachewrite import CacheLock
from featcache.checksums import H5_ERRORS
from featcache.errors import FeatcacheError
from featcache.partial import CacheRows, ReusableCache
from featcache.shards import ShardStore

log = logging.getLogger(__name__)


@dataclass
class UpToDate:
    """What a rerun with nothing to do reports: the cache's counts, skipped files, rows and map shape."""

    counts: dict
    skipped: list[dict]
    reused_rows: int
    feature_shape: tuple


def plan_rows(old: ReusableCache | None, files: list, unreadable: list[dict], augment_copies: int,
              max_pixels: int) -> tuple[list, CacheRows, list[dict]]:
    """The files to have rows for, their rows, and the skipped files to report.

    Files the old cache skipped (same path and content) stay skipped unless a raised ``max_pixels`` now
    admits them; ``unreadable`` files are reported after them.
    """
    known_bad = {key: s for key, s in (old.skipped if old else {}).items()
                 if s.get("pixels", 0) <= 0 or s["pixels"] > max_pixels}  # retry what a raised limit admits
    good = [f for f in files if (f.record.path, f.sha256) not in known_bad] if known_bad else files
    wanted = CacheRows.plan(good, augment_copies)  # per-row state in arrays (issue 10)
    present = {(f.record.path, f.sha256) for f in files} if known_bad else set()
    skipped = [s for key, s in known_bad.items() if key in present]
    return good, wanted, skipped + list(unreadable)


def nothing_to_do(paths: CachePaths, fingerprint: str, lock: Path, files: list, unreadable: list[dict],
                  augment_copies: int, max_pixels: int, random_weights: bool) -> UpToDate | None:
    """An ``UpToDate`` when the complete cache at ``paths`` holds every wanted row and skips the same files,
    with nothing of a killed run beside it; else None (the full path decides, and reports any error)."""
    if not paths.final.exists() or paths.partial.exists() or (random_weights and not paths.weights.exists()):
        return None
    if paths.shards.is_dir() and any(paths.shards.glob(f"*{INCOMPLETE_SUFFIX}")):
        return None
    if not _row_count_can_match(paths.final, files, augment_copies):
        return None  # files were added or removed: told before the checks and the row keys of 100,000 rows
    try:
        with CacheLock(lock):
            old = ReusableCache.open(paths.final, fingerprint)
            try:
                return _compare(old, ShardStore(paths.shards, fingerprint), files, unreadable, augment_copies,
                                max_pixels)
            finally:
                old.close()
    except (FeatcacheError, OSError, *H5_ERRORS) as exc:
        log.debug("%s: the full path decides (%s)", paths.final, exc)
        return None


def _row_count_can_match(path: Path, files: list, augment_copies: int) -> bool:
    """Whether the cache's row count (its manifest's, read without checks) can be that of ``files``: all their
    rows, less those of files it skipped. A wrong count can only send the run down the full path, which checks
    everything; so any doubt (an unreadable file or manifest) answers True and the full comparison decides."""
    try:
        with h5py.File(path, "r") as handle:
            manifest = json.loads(handle.attrs["manifest"])
        rows, skipped = int(manifest["counts"]["rows"]), len(manifest.get("skipped", []))
    except (OSError, KeyError, TypeError, ValueError, AttributeError, *H5_ERRORS):
        return True
    wanted = sum(augment_copies + 1 if f.record.split == "train" else 1 for f in files)
    return rows <= wanted <= rows + (augment_copies + 1) * skipped


def _compare(old: ReusableCache, shards: ShardStore, files, unreadable, augment_copies, max_pixels
             ) -> UpToDate | None:
    _, wanted, skipped = plan_rows(old, files, unreadable, augment_copies, max_pixels)
    if len(wanted) != old.n_rows or old.skipped_paths != {s["path"] for s in skipped}:
        return None
    in_shards = shards.index(trusted=old.shard_names)
    available = np.concatenate([in_shards.digests, *([] if old.sharded else [old.row_digests()])])
    if not np.isin(wanted.digests, available).all():
        return None
    manifest = json.loads(old.handle.attrs["manifest"])
    return UpToDate(counts={**wanted.counts(), "skipped": len(skipped)}, skipped=skipped, reused_rows=len(wanted),
                    feature_shape=tuple(manifest["feature_shape"]))
