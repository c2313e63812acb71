"""``featcache compact``: merge a sharded cache into one plain HDF5 file, and delete shard files no cache maps.

Merging copies every row through ``checksums.CheckedRows`` (so damaged shards are refused, never sealed
into the new file) into a ``CacheWriter`` file with the same name, datasets, row order and checksums;
it replaces the master atomically. Only the manifest's ``shards`` list is dropped.

Pruning deletes a shard file only when no master file in the same folder maps it (each master's sealed
manifest lists its shards), under the backbone's extract lock (no extract is writing), and never in a
shard folder whose extract is unfinished (``<name>.partial/`` exists: its shards are work to resume).
A stage that has the old master open while its shards are deleted reads fill values, which its
checksums refuse with a one-line error: compact when no stage is using the cache.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from featcache.cache import PARTIAL_SUFFIX, SHARDS_SUFFIX, list_caches, open_cache
from featcache.cachewrite import ROW_FIELDS, CacheLock, CacheWriter, FileTable
from featcache.checksums import H5_ERRORS, STREAM_BYTES, CheckedRows, read_checked
from featcache.errors import FeatcacheError
from featcache.integrity import first_line


@dataclass
class CompactSummary:
    merged: list[tuple[Path, int, int]]  # (cache, rows, shard files it mapped)
    removed: int  # shard files deleted
    freed_bytes: int


def compact_path(target: str | Path, prune_only: bool = False) -> CompactSummary:
    """Merge one cache (or every cache of a folder) into plain files, then prune unused shards.

    Raises:
        FeatcacheError: no cache there; a damaged cache or shard (nothing is replaced); a master that cannot
            be read (nothing is pruned: which shards it maps is unknown); a running extract (locked).
    """
    target = Path(target)
    caches = list_caches(target) if target.is_dir() else [target]
    if target.is_dir() and not caches and not list(target.glob(f"*{SHARDS_SUFFIX}")):
        raise FeatcacheError(f"{target} holds no cache to compact; pass a cache file or a cache folder. "
                             f"Received: target={str(target)!r}")
    merged = [] if prune_only else [merge_shards(path) for path in caches]
    removed, freed = prune_shards(target if target.is_dir() else target.parent)
    return CompactSummary([m for m in merged if m is not None], removed, freed)


def merge_shards(path: Path) -> tuple[Path, int, int] | None:
    """Rewrite a sharded cache as one plain file under the same name (atomic); None if it is plain already."""
    with open_cache(path) as handle:
        manifest = json.loads(handle.attrs["manifest"])
    with CacheLock(path.parent / f".{manifest['backbone']}.lock"):
        with open_cache(path) as handle:  # again, under the lock: an extract may have replaced it meanwhile
            manifest = json.loads(handle.attrs["manifest"])
            shards = manifest.pop("shards", [])
            if not shards:
                return None
            split = read_checked(handle, "split")
            columns = {name: read_checked(handle, name, split) for name in ROW_FIELDS if name != "split"}
            columns["split"] = split
            if "targets" in handle:  # a multi-label cache
                columns["targets"] = read_checked(handle, "targets", split)
            files = FileTable(path=read_checked(handle, "files/path").tolist(),
                              sha256=read_checked(handle, "files/sha256").astype(str).tolist(),
                              label=read_checked(handle, "files/label"), split=read_checked(handle, "files/split"),
                              patient=read_checked(handle, "files/patient").tolist())
            writer = CacheWriter(path, files, len(split), tuple(manifest["feature_shape"]), manifest["dtype"],
                                 _compression(path, shards[0]["file"]),
                                 columns["targets"].shape[1] if "targets" in columns else None)
            try:
                _copy_rows(handle, writer, split, columns)
                writer.commit(manifest)  # same rows, same bytes: the same checksums
            except BaseException:
                writer.abort()
                raise
    return path, len(split), len(shards)


def _copy_rows(handle, writer: CacheWriter, split: np.ndarray, columns: dict) -> None:
    features, pooled = CheckedRows(handle, "features", split), CheckedRows(handle, "pooled", split)
    row_bytes = max(1, int(np.prod(handle["features"].shape[1:])) * handle["features"].dtype.itemsize)
    block = max(1, STREAM_BYTES // row_bytes)
    for start in range(0, len(split), block):
        stop = min(start + block, len(split))
        writer.write_rows(start, features.read(stop - start), pooled.read(stop - start),
                          **{name: values[start:stop] for name, values in columns.items()})
    features.finish()  # every row read matched the manifest: nothing damaged is sealed into the new file
    pooled.finish()


def _compression(path: Path, shard: str) -> str | None:
    with h5py.File(path.parent / shard, "r") as handle:
        return handle["features"].compression


def prune_shards(cache_dir: Path) -> tuple[int, int]:
    """Delete the shard files no master in ``cache_dir`` maps; returns (files deleted, bytes freed)."""
    removed = freed = 0
    for folder in sorted(cache_dir.glob(f"*{SHARDS_SUFFIX}")):
        name = folder.name[: -len(SHARDS_SUFFIX)]
        if (cache_dir / f"{name}{PARTIAL_SUFFIX}").exists():
            continue  # an unfinished extract: its shards are the work a rerun resumes
        with CacheLock(cache_dir / f".{name.rsplit('-', 1)[0]}.lock"):
            mapped = _mapped_shards(cache_dir)
            for shard in sorted(folder.iterdir()):
                if shard.resolve() not in mapped and shard.is_file():
                    freed += shard.stat().st_size
                    shard.unlink()
                    removed += 1
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
    return removed, freed


def _mapped_shards(cache_dir: Path) -> set[Path]:
    """Every shard file a master in ``cache_dir`` maps (by its manifest)."""
    mapped = set()
    for master in list_caches(cache_dir):
        try:
            with h5py.File(master, "r") as handle:
                entries = json.loads(handle.attrs["manifest"]).get("shards", [])
            mapped |= {(master.parent / entry["file"]).resolve() for entry in entries}
        except (*H5_ERRORS, AttributeError) as exc:
            raise FeatcacheError(f"Cannot tell which shards {master} maps ({first_line(exc)}), so none are deleted; "
                                 f"repair or remove it first. Received: file={str(master)!r}") from None
    return mapped


def format_compact(summary: CompactSummary) -> str:
    lines = [f"{path}: {rows} rows from {shards} shard files merged into one file"
             for path, rows, shards in summary.merged]
    lines.append(f"removed {summary.removed} unused shard files ({summary.freed_bytes / 2**20:.1f} MiB)")
    return "\n".join(lines)
