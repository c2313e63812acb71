"""The master file of a sharded cache: /features and /pooled as HDF5 virtual datasets over shard files.

The master has the layout of ``featcache.cache`` (same names, shapes, dtypes, manifest); only the two
large datasets are virtual. Row ``i`` of the master maps to one row of one shard; consecutive rows of
the same shard in the same order form one mapping, so a cache built in one go has one mapping per shard.
Source paths are relative to the master (``<name>.shards/<id>.h5``): a cache folder can be moved whole.
The manifest lists every shard the master maps with its seal (``manifest["shards"]``), and
``cache.open_cache`` refuses the master when one is missing or was replaced: HDF5 itself would read a
missing source as fill values (NaN here, which the value checks refuse as well).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import h5py
import numpy as np
from h5py import h5s

from featcache.cache import FORMAT_VERSION, text_sha256
from featcache.cachewrite import ROW_DTYPES, ROW_FIELDS, STR, FileTable, atomic_h5
from featcache.checksums import BY_ROW, H5_ERRORS, Digests, dataset_records
from featcache.errors import DamagedFileError
from featcache.integrity import first_line
from featcache.shards import content_digests, read_seal


def mapping_runs(sources: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """Maximal runs of master rows that map to consecutive rows of one shard.

    Args:
        sources: per master row, (shard number, row in the shard).

    Returns:
        ``(start, stop, shard number, first shard row)`` per run, in master order.
    """
    n = len(sources)
    shard = np.fromiter((s for s, _ in sources), np.int64, n)
    offset = np.fromiter((o for _, o in sources), np.int64, n)
    breaks = np.flatnonzero((shard[1:] != shard[:-1]) | (offset[1:] != offset[:-1] + 1)) + 1
    starts, stops = np.concatenate([[0], breaks]), np.concatenate([breaks, [n]])
    return list(zip(starts.tolist(), stops.tolist(), shard[starts].tolist(), offset[starts].tolist())) if n else []


def write_master(final: Path, shards: list[Path], sources: list[tuple[int, int]], files: FileTable,
                 columns: dict[str, np.ndarray], manifest: dict) -> int:
    """Write the master file of a sharded cache under ``.incomplete``, then rename it into place; returns the
    number of runs of rows its virtual datasets map (``cache.compact_hint``).

    The checksums of /features and /pooled (per split, in master row order; the ``rows`` scheme of
    ``featcache.checksums``) are made of the row digests the shards store, 16 bytes a row: sealing a master
    costs its row count, not a read of every map. A reader recomputes them from the bytes it reads.

    Args:
        final: the master's final path.
        shards: the shard files the rows come from (inside ``final``'s folder tree).
        sources: per row, (index into ``shards``, row in that shard), in final row order.
        files: the per-file table.
        columns: the ROW_FIELDS, one value per row, and ``targets`` (n, k) for a multi-label cache.
        manifest: embedded, with ``datasets`` (checksums) and ``shards`` (file and seal of each) added.

    Raises:
        DamagedFileError: a shard is missing or cannot be read.
        StorageError: the master cannot be written (nothing is left behind).
    """
    n = len(sources)
    used = sorted({s for s, _ in sources})
    renumber = {old: new for new, old in enumerate(used)}
    shards = [shards[i] for i in used]
    sources = [(renumber[s], o) for s, o in sources]
    records = [read_seal(path) for path in shards]
    relative = [os.path.relpath(path, final.parent) for path in shards]
    feature_shape = tuple(manifest["feature_shape"])
    with atomic_h5(final) as handle:
        handle.attrs["complete"] = False
        digests = Digests(by_row=BY_ROW)
        split = np.asarray(columns["split"], ROW_DTYPES["split"])
        runs = _map_rows(handle, shards, relative, records, sources, split, feature_shape, manifest["dtype"], digests)
        for name in (*ROW_FIELDS, *(["targets"] if "targets" in columns else [])):
            values = np.asarray(columns[name], ROW_DTYPES[name])
            handle.create_dataset(name, data=values, chunks=(min(2**16, max(n, 1)), *values.shape[1:]),
                                  fletcher32=True)
            digests.update(name, values, split)
        _write_files(handle, files, digests)
        manifest = {**manifest, "datasets": dataset_records(handle, digests),
                    "shards": [{"file": rel, "rows": rec["rows"], "seal": seal}
                               for rel, (rec, seal) in zip(relative, records)]}
        text = json.dumps(manifest, sort_keys=True, default=str)
        handle.attrs["manifest"] = text
        handle.attrs["manifest_sha256"] = text_sha256(text)
        handle.attrs["format_version"] = FORMAT_VERSION
        handle.attrs["fingerprint"] = manifest["fingerprint"]
        handle.attrs["complete"] = True
    return runs


def _map_rows(handle, shards, relative, records, sources, split, feature_shape, dtype, digests) -> int:
    """Create the virtual /features and /pooled, and digest the rows they map from the shards' row digests;
    returns the number of mapped runs."""
    n, channels = len(sources), feature_shape[-1]
    if n == 0:  # HDF5 needs at least one mapping: an empty cache has plain empty datasets
        handle.create_dataset("features", (0, *feature_shape), dtype=dtype)
        handle.create_dataset("pooled", (0, channels), dtype="float32")
        return 0
    layouts = {"features": h5py.VirtualLayout((n, *feature_shape), dtype),
               "pooled": h5py.VirtualLayout((n, channels), "float32")}
    runs = mapping_runs(sources)
    for name, layout in layouts.items():
        _set_mappings(layout, name, runs, relative, [rec["rows"] for rec, _ in records])
    number = np.fromiter((s for s, _ in sources), np.int64, n)
    offset = np.fromiter((o for _, o in sources), np.int64, n)
    for name in layouts:
        per_shard = [_shard_digests(path, name, rec) for path, (rec, _) in zip(shards, records)]
        base = np.cumsum([0] + [len(d) for d in per_shard])[:-1]
        digests.update_rows(name, np.concatenate(per_shard)[base[number] + offset], split)
    for name, layout in layouts.items():
        handle.create_virtual_dataset(name, layout, fillvalue=np.nan)
    return len(runs)


def _set_mappings(layout: h5py.VirtualLayout, name: str, runs: list, relative: list[str], rows: list[int]) -> None:
    """Map each run of ``layout``'s rows to the rows of /``name`` in its shard file. What ``layout[start:stop] =
    h5py.VirtualSource(file, name, shape)[first:first + stop - start]`` does (the same hyperslabs, file names and
    dataset name), without h5py's copy of a source and its selection objects per run: 1,000 runs cost 10 ms."""
    rest = tuple(layout.shape[1:])
    zeros = (0,) * len(rest)
    master = h5s.create_simple(tuple(layout.shape))
    sources = [h5s.create_simple((count, *rest)) for count in rows]
    files = [_hdf5_filename(path) for path in relative]
    dataset = name.encode("utf-8")
    for start, stop, shard, first in runs:
        master.select_hyperslab((start, *zeros), (stop - start, *rest))
        sources[shard].select_hyperslab((first, *zeros), (stop - start, *rest))
        layout.dcpl.set_virtual(master, files[shard], dataset, sources[shard])  # HDF5 copies both selections


def _hdf5_filename(path: str) -> bytes:
    """A file name as the HDF5 library takes it: what h5py's (private) ``filename_encode`` gives, UTF-8 on
    Windows and the file-system encoding elsewhere."""
    return path.encode("utf-8") if sys.platform == "win32" else os.fsencode(path)


def _shard_digests(path: Path, name: str, record: dict) -> np.ndarray:
    """The shard's row digests of /``name`` (``shards.content_digests``), as many as its seal says it has rows."""
    rows = record["rows"]
    try:
        with h5py.File(path, "r") as handle:
            digests = content_digests(handle, name, record)
    except H5_ERRORS as exc:
        raise DamagedFileError(f"Shard file {path} cannot be read ({first_line(exc)}). "
                               f"Received: shard={str(path)!r}") from None
    if len(digests) != rows:
        raise DamagedFileError(f"Shard file {path} has {len(digests)} rows of /{name}, its seal says {rows}. "
                               f"Received: shard={str(path)!r}")
    return digests


def _write_files(handle, files: FileTable, digests: Digests) -> None:
    columns = {"path": np.array(files.path, dtype=object), "sha256": np.array(files.sha256, dtype="S64"),
               "label": np.asarray(files.label, dtype=np.int16), "split": np.asarray(files.split, dtype=np.uint8),
               "patient": np.array(files.patient, dtype=object)}
    group = handle.create_group("files")
    for name, values in columns.items():
        group.create_dataset(name, data=values, dtype=STR if values.dtype == object else values.dtype)
        digests.update(f"files/{name}", values)
