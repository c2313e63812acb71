"""Work in progress of one cache: finished batches, reusable rows of an older cache, and the assembly.

Each finished extraction batch is one ``.npz`` in ``<name>.partial/``, written under a temporary
name and renamed, so a killed run loses at most the batches in flight. When every row exists,
``assemble_cache`` writes the complete cache through ``CacheWriter`` (which renames it into place).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from featcache.cache import CachePaths, CacheWriter, FileTable, open_cache, read_rows
from featcache.checksums import check_dataset, read_checked
from featcache.data import SPLIT_CODES
from featcache.errors import FeatcacheError

log = logging.getLogger(__name__)

ASSEMBLE_ROWS = 256  # rows copied per step when the cache file is assembled
SAVED_WEIGHTS = "backbone.weights.h5"  # random initialisations, in the work folder until the cache is whole


class BatchStore:
    """Finished extraction batches of one cache, one ``.npz`` each, in ``<name>.partial/``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def write(self, batch_id: str, features: np.ndarray, pooled: np.ndarray, paths: list[str],
              sha256: list[str], copy_index: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{batch_id}.tmp.npz"
        with open(tmp, "wb") as handle:
            np.savez(handle, features=features, pooled=pooled, path=np.array(paths),
                     sha256=np.array(sha256, dtype="S64"), copy_index=np.asarray(copy_index, np.int16))
        # No fsync: a killed process loses nothing the page cache holds, and after a power cut a batch
        # that did not reach the disk fails to load in index() and is computed again.
        os.replace(tmp, self.folder / f"{batch_id}.npz")

    def index(self) -> dict[tuple[str, str, int], tuple[Path, int]]:
        """(path, sha256, copy_index) -> (batch file, row in it), for every finished batch."""
        found: dict[tuple[str, str, int], tuple[Path, int]] = {}
        if not self.folder.is_dir():
            return found
        for batch in sorted(self.folder.glob("[!.]*.npz")):
            try:
                with np.load(batch) as data:
                    keys = zip(data["path"].tolist(), data["sha256"].astype(str).tolist(), data["copy_index"].tolist())
                    for offset, key in enumerate(keys):
                        found[key] = (batch, offset)
            except Exception as exc:  # a batch cut short by a power loss (EOFError, BadZipFile, ...): recompute it
                log.warning("Ignoring unreadable batch %s (%s)", batch.name, exc)
        return found

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


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
        self.skipped = {(s["path"], s.get("sha256")): s["error"] for s in manifest.get("skipped", []) if s.get("sha256")}
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
