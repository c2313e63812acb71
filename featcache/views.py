"""What head training reads from a cache, within ``--memory-budget``: the train and validation pooled vectors
loaded whole when they fit, else streamed from /pooled a shuffle window at a time (a background thread reads
the next window while the current one trains). Both make the same epochs (``head.epoch_windows``), the same
standardization statistics and the same validation batches, so the same trials.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from featcache.cache import POOLED_CHUNK_ROWS, is_multilabel, open_cache
from featcache.checksums import H5_ERRORS, CheckedRows, read_checked
from featcache.errors import DamagedFileError, FeatcacheError
from featcache.head import (STATS_CHUNK_ROWS, VAL_BATCH_ROWS, EpochLayout, InputStats, TrainViews, input_stats,
                            input_stats_of_chunks, pick_views)
from featcache.integrity import first_line

SHUFFLE_WINDOW_BYTES = 128 * 2**20  # file rows read per shuffle window (a window's views are shuffled together)
IN_MEMORY_COPIES = 3  # a whole load holds the train+val rows about three times (read, split, standardized)
PROBE_SEED = 0  # the probe's subsample depends on the cache and the budget only, as probe.json is kept per cache
ROW_BYTES = 4  # float32


@dataclass(frozen=True)
class HeadData:
    """What head training reads from a cache: train views, validation originals, the manifest.

    Attributes:
        train: the training views, in memory (``train.pooled``) or streamed (``train.stream``).
        val_pooled: (m, c) float32 validation originals, or a ``ValRows`` read a batch at a time.
        val_labels: (m,) class indices, or (m, k) 0/1 targets with NaN where masked (multi-label caches).
        manifest: the cache's manifest.
        stats: channel mean and variance of the training views, for standardized heads.
        path: the cache file.
        memory_budget: bytes of vectors held at once; None: no limit (everything in memory).
    """

    train: TrainViews
    val_pooled: "np.ndarray | ValRows"
    val_labels: np.ndarray
    manifest: dict
    stats: InputStats
    path: Path | None = None
    memory_budget: int | None = None

    @property
    def streamed(self) -> bool:
        return self.train.pooled is None


def load_head_data(path: str | Path, memory_budget: int | None = None) -> HeadData:
    """Pooled vectors of train rows (originals and copies) and validation originals; never /features and
    nothing of test rows but their split code. Every row used is checked against the SHA-256 recorded at
    extraction: here, in one pass, when streamed (later epochs rely on HDF5's fletcher32 per chunk).

    Args:
        path: a complete cache.
        memory_budget: bytes of vectors held at once. Train+val rows that fit ``IN_MEMORY_COPIES`` times are
            loaded whole; otherwise the training views are streamed, and the validation rows too when they
            exceed half the budget. None loads everything.

    Raises:
        IncompleteCacheError, CacheMismatchError, DamagedFileError: an unfinished, foreign or damaged cache.
        FeatcacheError: a split without rows or without one of the classes; a budget too small to stream.
    """
    path = Path(path)
    with open_cache(path) as handle:
        split = read_checked(handle, "split")
        parts = ("train", "val")
        manifest = json.loads(handle.attrs["manifest"])
        if is_multilabel(manifest):  # (n, k) targets, NaN masked: the labels of the multi-label head
            labels = read_checked(handle, "targets", split, parts)
        else:
            labels = read_checked(handle, "labels", split, parts).astype(np.int64)
        copy_index = read_checked(handle, "copy_index", split, parts)
        source_index = read_checked(handle, "source_index", split, parts)
        rows = np.flatnonzero(np.isin(split, (0, 1)))  # file row of each loaded row
        tv_split = split[rows]
        is_train, is_val = tv_split == 0, (tv_split == 1) & (copy_index == 0)
        _check_classes(path, manifest, labels, is_train, is_val)
        pooled = handle["pooled"]
        # The /pooled chunk of a plain cache; a sharded master's /pooled is virtual (no chunks of its own) and
        # gets the same blocks, so a cache gives the same epochs sharded or compacted.
        channels, block_rows = pooled.shape[1], min(POOLED_CHUNK_ROWS, max(1, pooled.shape[0]))
        window_blocks = max(1, SHUFFLE_WINDOW_BYTES // (block_rows * channels * ROW_BYTES))
        layout = EpochLayout(rows[is_train], block_rows, window_blocks)
        row_bytes = channels * ROW_BYTES
        if memory_budget is None or IN_MEMORY_COPIES * len(rows) * row_bytes <= memory_budget:
            values = read_checked(handle, "pooled", split, parts)  # each mask indexes it once: no other copy
            train = TrainViews(values[is_train], labels[is_train], source_index[is_train], layout)
            return HeadData(train, values[is_val], labels[is_val], manifest, input_stats(train.pooled), path,
                            memory_budget)
        _check_streamable(path, memory_budget, block_rows * window_blocks * row_bytes)
        stats = _stats_pass(handle, split)
        val_rows = rows[is_val]
        held = len(val_rows) * row_bytes <= memory_budget // 2
        val = _val_pass(handle, split, copy_index[tv_split == 1] == 0, held)
    stream = BlockReader(path, layout.file_rows, layout, channels)
    train = TrainViews(None, labels[is_train], source_index[is_train], layout, stream)
    val = val if held else ValRows(path, val_rows)
    return HeadData(train, val, labels[is_val], manifest, stats, path, memory_budget)


def _check_classes(path, manifest, labels, is_train, is_val) -> None:
    if is_multilabel(manifest):
        _check_labels(path, manifest, labels, is_train, is_val)
        return
    classes = len(manifest["class_names"])  # 2: the reference head; more: the softmax head (featcache.multiclass)
    if classes < 2:
        raise FeatcacheError(f"A head needs at least two classes; {path} has {manifest['class_names']}. "
                             f"Received: class_names={manifest['class_names']}")
    for name, mask in (("train", is_train), ("validation", is_val)):
        if len(np.unique(labels[mask])) < classes:
            raise FeatcacheError(f"The {name} split of {path} lacks a class; add images or change the split seed. "
                                 f"Received: {name}_labels={np.unique(labels[mask]).tolist()}")


def _check_labels(path, manifest, targets, is_train, is_val) -> None:
    """Multi-label: each label has a 0 and a 1 among its unmasked train rows and validation rows."""
    for name, mask in (("train", is_train), ("validation", is_val)):
        for j, label in enumerate(manifest["class_names"]):
            values = targets[mask, j]
            present = sorted({int(v) for v in values[np.isfinite(values)]})
            if present != [0, 1]:
                raise FeatcacheError(f"The {name} split of {path} lacks a 0 or a 1 of label {label!r} among its "
                                     f"unmasked rows; add images or change the split seed. "
                                     f"Received: {name}_{label}={present}")


def _check_streamable(path, memory_budget: int, window_bytes: int) -> None:
    """Streaming holds a window being read, the views drawn from it and the next window's (a quarter of the
    budget at most), and validation rows or a probe subsample in the rest."""
    if 4 * window_bytes > memory_budget:
        raise FeatcacheError(f"--memory-budget is too small to stream {path}: its shuffle windows of "
                             f"{window_bytes / 2**20:.1f} MiB need a budget of at least {4 * window_bytes} bytes "
                             f"({4 * window_bytes / 2**20:.1f} MiB). Received: memory_budget={memory_budget}")


def _stats_pass(handle: h5py.File, split: np.ndarray) -> InputStats:
    """The training views' statistics in one pass over /pooled, which also checks their SHA-256. The chunks are
    ``input_stats``'s (``STATS_CHUNK_ROWS`` training rows in file order), so the bits are the same."""
    rows = CheckedRows(handle, "pooled", split, ("train",))
    chunks = (rows.read(STATS_CHUNK_ROWS) for _ in range(0, len(rows.rows), STATS_CHUNK_ROWS))
    stats = input_stats_of_chunks(chunks)
    rows.finish()
    return stats


def _val_pass(handle: h5py.File, split: np.ndarray, original: np.ndarray, held: bool) -> np.ndarray | None:
    """Check the validation rows' SHA-256; return the originals when ``held``, else read and drop them."""
    rows = CheckedRows(handle, "pooled", split, ("val",))
    if held:
        values = rows.read(len(rows.rows))
        rows.finish()
        return values[original] if not original.all() else values
    for _ in range(0, len(rows.rows), VAL_BATCH_ROWS):
        rows.read(VAL_BATCH_ROWS)
    rows.finish()
    return None


class BlockReader:
    """``TrainViews.stream``: the views of each window of an epoch, read from /pooled block by block.

    A window's blocks are contiguous, chunk-aligned row ranges, read straight into one reused buffer (no HDF5
    chunk cache is needed: every chunk is read whole, once); the views are gathered from it. A background
    thread reads the next window while the caller trains on the current one.
    """

    def __init__(self, path: Path, file_rows: np.ndarray, layout: EpochLayout, channels: int):
        self.path, self.file_rows, self.layout, self.channels = Path(path), file_rows, layout, channels

    def __call__(self, windows):
        buffer = np.empty((self.layout.window_blocks * self.layout.block_rows, self.channels), np.float32)
        # HDF5 reads a whole chunk into its cache only if it fits: a small cache sends whole-chunk reads
        # straight through, and h5py's default of 1 MiB per open dataset is all the metadata needs.
        with h5py.File(self.path, "r", rdcc_nbytes=2**20) as handle, ThreadPoolExecutor(1) as pool:
            dataset = handle["pooled"]
            pending = pool.submit(self._read, dataset, buffer, windows[0]) if windows else None
            for index in range(len(windows)):
                views = pending.result()
                if index + 1 < len(windows):
                    pending = pool.submit(self._read, dataset, buffer, windows[index + 1])
                yield views

    def _read(self, dataset: h5py.Dataset, buffer: np.ndarray, window) -> np.ndarray:
        blocks, rows = window
        size, n = self.layout.block_rows, dataset.shape[0]
        try:
            for slot, block in enumerate(blocks):
                start, stop = int(block) * size, min(int(block + 1) * size, n)
                dataset.read_direct(buffer, np.s_[start:stop], np.s_[slot * size:slot * size + stop - start])
        except H5_ERRORS as exc:
            raise DamagedFileError(f"Cache {self.path} is damaged: /pooled cannot be read ({first_line(exc)}). "
                                   f"Delete it and re-run 'featcache extract'. Received: dataset='pooled'") from None
        file_rows = self.file_rows[rows]
        position = np.searchsorted(blocks, file_rows // size) * size + file_rows % size
        return buffer[position]


class ValRows:
    """Validation originals read from the cache ``VAL_BATCH_ROWS`` at a time, when they exceed half the budget."""

    def __init__(self, path: Path, file_rows: np.ndarray):
        self.path, self.file_rows = Path(path), file_rows

    def __len__(self) -> int:
        return len(self.file_rows)

    def batches(self):
        from featcache.cache import read_rows

        with h5py.File(self.path, "r") as handle:
            for start in range(0, len(self.file_rows), VAL_BATCH_ROWS):
                yield read_rows(handle["pooled"], self.file_rows[start:start + VAL_BATCH_ROWS])


def probe_rows(data: HeadData) -> np.ndarray | None:
    """The training rows the probe is fitted on: every view when they fit half the budget, else a seeded
    subsample of one view per image (of as many images as fit). None: every view.

    A function of the cache and the budget alone (``PROBE_SEED``), never of ``--seed``: ``probe.json`` is kept per
    cache. Whole loads and streams of one cache under one budget pick the same rows.
    """
    cap = None if data.memory_budget is None else data.memory_budget // 2 // (_channels(data) * ROW_BYTES)
    source_index = data.train.source_index
    if cap is None or len(source_index) <= cap:
        return None
    rng = np.random.default_rng(PROBE_SEED)
    picks = pick_views(source_index, rng)
    if len(picks) > cap:
        picks = rng.choice(picks, cap, replace=False)
    return np.sort(picks)


def read_train_rows(data: HeadData, rows: np.ndarray | None) -> np.ndarray:
    """(len(rows), c) float32 pooled vectors of training rows (every row when None), from memory or the file."""
    if not data.streamed:
        return np.asarray(data.train.pooled if rows is None else data.train.pooled[rows])
    layout = data.train.layout
    rows = np.arange(len(data.train.source_index)) if rows is None else np.sort(rows)
    block = layout.file_rows[rows] // layout.block_rows
    blocks = np.unique(block)
    windows = [(group, rows[np.isin(block, group)])
               for group in (blocks[i:i + layout.window_blocks] for i in range(0, len(blocks), layout.window_blocks))]
    out = np.empty((len(rows), _channels(data)), np.float32)
    done = 0
    for views in data.train.stream(windows):  # the windows' rows are consecutive runs of ``rows``
        out[done:done + len(views)] = views
        done += len(views)
    return out


def _channels(data: HeadData) -> int:
    return int(data.manifest["feature_shape"][-1])
