"""The reserved test rows of a cache and their raw files, read back a batch at a time for ``evaluate``:
which files to read, their content hashes and labels, and per batch the decoded images beside the
cached maps and pooled vectors of the same rows. Nothing here grows with the test set but per-row
scalars and names; the maps stream through ``checksums.CheckedRows``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from featcache.cache import is_multilabel, open_cache, read_manifest
from featcache.checksums import CheckedRows, read_checked
from featcache.data import IMAGE_EXTENSIONS, SPLIT_CODES
from featcache.decode import MAX_PIXELS, decode_bytes
from featcache.errors import CacheMismatchError, DataError

log = logging.getLogger(__name__)

TEST = ("test",)


@dataclass(frozen=True)
class TestRows:
    """Every row of a cache's test split (their digests cover them all), and what is needed to read them.

    Attributes:
        cache_path: the cache file.
        split: (N,) the whole /split column, checked.
        rows: (t,) the test rows, increasing (the order of their digest).
        original: (t,) copy 0 (test images are never augmented; a copy would be skipped).
        paths, hashes: (t,) each row's file, relative to the data folder, and its SHA-256 at extraction.
        labels: (t,) int64, or (t, k) float32 targets with NaN where masked (multi-label caches).
        train_labels: original rows of the train split, for the majority baseline (idem).
    """

    cache_path: Path
    split: np.ndarray
    rows: np.ndarray
    original: np.ndarray
    paths: list[str]
    hashes: list[str]
    labels: np.ndarray
    train_labels: np.ndarray


@dataclass(frozen=True)
class TestBatch:
    """The images of one batch of test rows that could be read, with their cached rows.

    Attributes:
        rows: test rows this batch covered (read or skipped), for progress.
        paths: (k,) files decoded; labels: (k,); images: (k, s, s, 3) uint8 decoded now;
        features: (k, h, w, c) and pooled: (k, c) as cached.
    """

    rows: int
    paths: list[str]
    labels: np.ndarray
    images: np.ndarray
    features: np.ndarray
    pooled: np.ndarray


def read_test_rows(cache_path: Path, data_dir: Path) -> TestRows:
    """The test rows of a cache, their per-row columns checked (``read_checked``); no maps are read. The
    files and labels come from the cache's own file table, so a label-file data set (whose test rows the
    label file chose) reads the same way as class folders.

    Raises:
        DataError: no ``test/`` folder in ``data_dir`` (class folders), or no folder ``data_dir`` (label file).
        DamagedFileError: a column fails its checks.
    """
    manifest = read_manifest(cache_path)
    labeled = "labels" in manifest
    if not (data_dir.is_dir() if labeled else (data_dir / "test").is_dir()):
        missing = data_dir if labeled else data_dir / "test"
        raise DataError(f"No {'data' if labeled else 'test'} folder {missing}; pass --data DIR, the folder "
                        f"'featcache extract' read. Received: data={str(data_dir)!r}")
    with open_cache(cache_path) as handle:
        split = read_checked(handle, "split")
        copy = read_checked(handle, "copy_index", split)
        labels = read_checked(handle, "targets" if is_multilabel(manifest) else "labels", split)
        rows = np.flatnonzero(split == SPLIT_CODES["test"])
        source = read_checked(handle, "source_index", split, TEST)
        paths = read_checked(handle, "files/path")[source].tolist()
        hashes = read_checked(handle, "files/sha256")[source].astype(str).tolist()
    train_labels = labels[(split == SPLIT_CODES["train"]) & (copy == 0)]
    test = TestRows(Path(cache_path), split, rows, copy[rows] == 0, paths, hashes,
                    labels[rows] if labels.ndim == 2 else labels[rows].astype(np.int64), train_labels)
    if not labeled:  # a label file lists its test rows; nothing else in the folder is a test image
        _warn_uncached(data_dir, {p for p, keep in zip(paths, test.original) if keep})
    return test


@dataclass
class TestImages:
    """The raw files behind a cache's test rows, read, checked against their hashes and decoded in batches.

    A file whose content changed since extraction is an error, raised after the last batch with the count
    of all changed files (no image is decoded once one has been found); a file now missing, unreadable or
    over ``max_pixels`` is skipped and listed in ``skipped``.
    """

    test: TestRows
    data_dir: Path
    image_size: int
    max_pixels: int = MAX_PIXELS
    scaled: bool = False  # --decode fast: as the cache was extracted
    skipped: list[dict] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def batches(self, width: int) -> Iterator[TestBatch]:
        """Batches of ``width`` test rows, in row order; the caller must exhaust the iterator.

        After the last batch the SHA-256 of every test row of /features and /pooled (each read exactly once,
        in order) is compared with the manifest, so a caller that writes nothing before the iterator ends
        writes nothing from a damaged cache.

        Raises:
            CacheMismatchError: test files changed since extraction.
            DamagedFileError: the cached test rows fail a check (values, fletcher32, SHA-256).
            DataError: none of the test images can be read.
        """
        n, used = len(self.test.rows), 0
        with open_cache(self.test.cache_path) as handle:
            features = CheckedRows(handle, "features", self.test.split, TEST)
            pooled = CheckedRows(handle, "pooled", self.test.split, TEST)
            for start in range(0, n, width):
                stop = min(start + width, n)
                maps, vectors = features.read(stop - start), pooled.read(stop - start)
                kept, images = self._decode(range(start, stop))
                used += len(kept)
                local = np.array(kept, np.int64) - start
                yield TestBatch(stop - start, [self.test.paths[i] for i in kept], self.test.labels[kept],
                                np.stack(images) if images else np.empty((0, self.image_size, self.image_size, 3),
                                                                         np.uint8),
                                maps[local], vectors[local])
            self._raise_changed()
            features.finish()
            pooled.finish()
        for item in self.skipped:
            log.warning("skipped test image %s: %s", item["path"], item["error"])
        if not used:
            first = self.skipped[0]["path"] if self.skipped else "-"
            raise DataError(f"None of the {int(self.test.original.sum())} cached test images can be read from "
                            f"{self.data_dir} (e.g. {first}); pass --data DIR. Received: data={str(self.data_dir)!r}")

    def _decode(self, positions) -> tuple[list[int], list[np.ndarray]]:
        """Read, hash and decode the files of these test rows; (positions kept, their images)."""
        kept, images = [], []
        for i in positions:
            if not self.test.original[i]:
                continue
            path = self.test.paths[i]
            try:
                encoded = (self.data_dir / path).read_bytes()
            except OSError as exc:
                self.skipped.append({"path": path, "error": f"cannot read: {exc.strerror}"})
                continue
            if hashlib.sha256(encoded).hexdigest() != self.test.hashes[i]:
                self.changed.append(path)
            if self.changed:  # an error at the end: only count the others
                continue
            try:
                images.append(decode_bytes(encoded, self.image_size, name=path, max_pixels=self.max_pixels,
                                           scaled=self.scaled))
                kept.append(i)
            except DataError as exc:
                self.skipped.append({"path": path, "error": str(exc)})
        return kept, images

    def _raise_changed(self) -> None:
        if self.changed:
            raise CacheMismatchError(
                f"{len(self.changed)} test images in {self.data_dir} changed since the cache was built (e.g. "
                f"{self.changed[0]}); re-run 'featcache extract' to update {self.test.cache_path.name}. "
                f"Received: data={str(self.data_dir)!r}")


def _warn_uncached(data_dir: Path, cached: set[str]) -> None:
    found = {p.relative_to(data_dir).as_posix() for p in (data_dir / "test").rglob("*")
             if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")}
    extra = sorted(found - cached)
    if extra:
        log.warning("%d test images are not in the cache (e.g. %s) and are not evaluated; re-run 'featcache "
                    "extract' to include them", len(extra), extra[0])
