"""Orchestration of ``featcache extract``: images -> augment -> backbone batches -> cache.

Decoding and augmentation run in a thread pool ahead of the backbone (``compute``), finished batches are
written by a background thread, and the cache file is assembled once every row exists.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import datetime
import glob
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from featcache import __version__
from featcache.backbones import (
    build_extractor, check_image_size, describe_preprocessing, get_backbone_spec, hash_weights, load_backbone,
    resolve_image_size,
)
from featcache.cache import FORMAT_VERSION, CachePaths, cache_bytes, compact_hint, compute_fingerprint
from featcache.cachewrite import CacheLock
from featcache.compute import ComputeTiming, compute_batches
from featcache.partial import SAVED_WEIGHTS, BatchStore, ReusableCache, ShardPacker, assemble_cache, save_weights
from featcache.shards import ShardStore, default_shard_rows
from featcache.config import ExtractConfig
from featcache.data import (
    VAL_FRACTION, ImageRecord, find_images, hash_file, read_split_registry, write_split_registry,
)
from featcache.decode import resize_settings
from featcache.dicom import DICOM_CONVERSION
from featcache.errors import FeatcacheError, storage_error
from featcache.gcpause import paused_gc, running_gc
from featcache.hashcache import HashCache, stat_keys
from featcache.labels import read_label_file
from featcache.labelset import find_labeled_images
from featcache.patients import PATIENT_PATTERN, describe_patients
from featcache.uptodate import nothing_to_do, plan_rows
from featcache.weightsmemo import WeightsMemo, memo_key, weights_stat

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class SourceFile:
    """A readable image file of the data folder, with its content hash."""

    record: ImageRecord
    sha256: str


@dataclass
class ExtractSummary:
    backbone: str
    cache_path: Path
    counts: dict
    skipped: list[dict]
    computed_rows: int
    reused_rows: int
    seconds: float
    size_bytes: int
    timing: "ComputeTiming | None" = None
    feature_shape: tuple | None = None
    image_size: int | None = None
    patients: str = ""
    left_out: int = 0
    mapped_runs: int = 0  # of the master this run wrote (0: none written)

    @property
    def images_per_second(self) -> float:
        """Rows per second of the backbone phase, decoding, augmentation and batch writes included."""
        return self.timing.rate(self.computed_rows) if self.timing else 0.0


def extract_features(config: ExtractConfig) -> list[ExtractSummary]:
    """Extract (or complete, or update) one cache per backbone.

    Raises:
        DataError, WeightsError, CacheLockedError: bad folder, weights or a second writer.
        StorageError: a file cannot be written (disk full, file-size limit, read-only folder); finished
            batches are kept, so the same call resumes once that is fixed.
    """
    for name in config.backbones:
        spec = get_backbone_spec(name)
        check_image_size(spec, resolve_image_size(spec, config.image_size))
    cache_dir = Path(config.cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise FeatcacheError(f"--cache-dir {cache_dir} is a file, not a folder; pass a folder (it is created if "
                             f"missing). Received: cache_dir={str(cache_dir)!r}")
    if config.engine == "ray":  # Ray only here: the local engine never imports it
        from featcache.ray_engine import prepare

        config = prepare(config)
    try:
        with paused_gc():  # the bookkeeping of 100,000 files; rows are computed with it running (gcpause)
            return _extract_all(config)
    except OSError as exc:
        if isinstance(exc, FeatcacheError) or exc.errno is None:
            raise
        raise storage_error(exc) from None


def _extract_all(config: ExtractConfig) -> list[ExtractSummary]:
    with CacheLock(Path(config.cache_dir) / ".split.lock"):
        previous = read_split_registry(config.cache_dir, config.seed)
        folder = _find_data(config, previous)
        assigned = _registry_assignments(folder.records)
        if {**previous, **assigned} != previous:  # a rerun writes nothing (a read-only cache folder works)
            write_split_registry(config.cache_dir, config.seed, {**previous, **assigned})
    patients = describe_patients([r.patient for r in folder.records])
    log.info("%s: %s", config.data_dir, patients)
    files, unreadable = _hash_files(folder, config.progress, config.cache_dir)
    unreadable += list(folder.skipped)
    summaries = [_extract_backbone(config, folder, files, unreadable, name) for name in config.backbones]
    for summary in summaries:
        summary.patients, summary.left_out = patients, len(folder.left_out)
    return summaries


def _registry_assignments(records) -> dict[str, str]:
    """Patient -> train|val for the registry: patients whose images all sit in one of them (a label file may
    put one patient in several splits; the registry cannot say that, so it keeps such patients out)."""
    splits: dict[str, set[str]] = {}
    for record in records:
        splits.setdefault(record.patient, set()).add(record.split)
    return {patient: s.pop() for patient, s in splits.items() if len(s) == 1 and "test" not in s}


def _find_data(config: ExtractConfig, previous: dict[str, str]):
    """Class folders, or the rows of ``--labels`` (one class column, one 0/1 column, or several 0/1 columns: a
    multi-label cache)."""
    if config.labels is None:
        return find_images(config.data_dir, config.seed, previous_split=previous,
                           patient_pattern=config.patient_pattern)
    labels = read_label_file(config.labels, config.data_dir, config.label_columns, config.uncertain)
    return find_labeled_images(config.data_dir, labels, config.seed, previous_split=previous,
                               patient_pattern=config.patient_pattern)


def _targets(folder) -> dict[str, tuple[float, ...]] | None:
    """A multi-label data set's path -> (k,) targets (NaN masked) for /targets; None for every other."""
    if folder.labels is None or folder.labels.kind != "multilabel":
        return None
    return {row.path: row.targets for row in folder.labels.rows}


HASH_THREADS = min(8, (os.cpu_count() or 1) + 2)  # hashlib and file reads release the GIL
HASH_CHUNK = 64  # files per task: many small files cost more in task overhead than in hashing


def _hash_files(folder, progress: bool = False, cache_dir: str | Path | None = None
                ) -> tuple[list[SourceFile], list[dict]]:
    """SHA-256 of every record's file, in record order; with ``cache_dir``, a hash remembered in its hash cache
    (``hashcache``) is reused when the file's whole stat key still matches. The files to read are hashed in a
    thread pool."""
    hashes = HashCache(cache_dir, folder.root) if cache_dir is not None else None
    records, root = folder.records, str(folder.root)  # strings: pathlib per file costs more than a stat
    prefix = root if root.endswith(os.sep) else root + os.sep  # os.path.join of relative paths, without its cost
    results: list = [None] * len(records)  # digest, or the OSError that stopped it
    keys: list = [None] * len(records)
    with tqdm(total=len(records), unit="file", desc="hash", disable=not progress, dynamic_ncols=True,
              leave=False) as bar:
        if hashes is not None:
            paths = [record.path for record in records]
            keys = stat_keys(prefix, paths)  # before reading: a later write changes them
            results = hashes.reuse_all(paths, keys)
            for i, key in enumerate(keys):
                if type(key) is not tuple:
                    results[i], keys[i] = key, None  # the OSError of its stat
            bar.update(len(records) - results.count(None))
        todo = [i for i, r in enumerate(results) if r is None]
        chunks = [todo[i:i + HASH_CHUNK] for i in range(0, len(todo), HASH_CHUNK)]
        with cf.ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="hash") as pool:
            for chunk, digests in zip(chunks, pool.map(lambda c: [_hash_or_error(prefix + records[i].path)
                                                                  for i in c], chunks)):
                for i, digest in zip(chunk, digests):
                    results[i] = digest
                    if hashes is not None and not isinstance(digest, OSError):
                        hashes.put(records[i].path, keys[i], digest)
                bar.update(len(chunk))
    files, unreadable = [], []
    for record, digest in zip(records, results):
        if isinstance(digest, OSError):
            unreadable.append({"path": record.path, "error": f"cannot read: {digest.strerror}"})
        else:
            files.append(SourceFile(record, digest))
    if hashes is not None:
        log.debug("hashes: %d of %d files reused from %s", len(records) - len(todo), len(records), hashes.path)
        hashes.save()
    return files, unreadable


def _hash_or_error(path: str):
    try:
        return hash_file(path)
    except OSError as exc:
        return exc


def _extract_backbone(config: ExtractConfig, folder, files: list[SourceFile], unreadable: list[dict],
                      name: str) -> ExtractSummary:
    started = time.perf_counter()
    spec = get_backbone_spec(name)
    name = spec.name  # the registry's spelling names the cache file and the lock
    config = dataclasses.replace(config, image_size=resolve_image_size(spec, config.image_size))
    memo = WeightsMemo(config.cache_dir)
    up_to_date = _up_to_date(config, spec, memo, folder, files, unreadable, started)
    if up_to_date is not None:
        return up_to_date  # nothing to do, told without TensorFlow
    precision = _effective_precision(config.precision)
    key, before = _memo_key(config, spec, precision), weights_stat(config.weights)
    backbone = load_backbone(spec, config.image_size, config.weights, config.seed, mixed=precision == "mixed")
    extractor = build_extractor(spec, backbone, config.image_size, config.feature_layer)  # checks --feature-layer
    weights_sha256 = hash_weights(backbone)
    memo.remember(key, _memo_key(config, spec, precision), weights_sha256, before)
    settings = _feature_settings(config, spec, weights_sha256, precision, folder)
    fingerprint = compute_fingerprint(settings)
    paths = CachePaths.for_fingerprint(config.cache_dir, name, fingerprint)
    with CacheLock(Path(config.cache_dir) / f".{name}.lock"), contextlib.ExitStack() as cleanup:
        old = ReusableCache.open(paths.final, fingerprint)
        if old is not None:
            cleanup.callback(old.close)  # on every way out: the old master's handle is not left open
        shards, store = ShardStore(paths.shards, fingerprint), BatchStore(paths.partial)
        shards.remove_leftovers()
        if config.weights == "random" and not paths.weights.exists():
            store.folder.mkdir(parents=True, exist_ok=True)
            save_weights(backbone, store.folder / SAVED_WEIGHTS)
        good, wanted, skipped = plan_rows(old, files, unreadable, config.augment_copies, config.max_pixels)
        in_shards = shards.index(trusted=old.shard_names if old else set())
        store.index()
        store.discard_packed(in_shards)  # batches killed between their shard's rename and their deletion
        plain = old is not None and not old.sharded
        available = np.concatenate([in_shards.digests, store.digests(), *([old.row_digests()] if plain else [])])
        todo = ~np.isin(wanted.digests, available)
        missing = wanted.select(todo).pairs()
        reused = len(wanted) - len(missing)
        feature_shape = tuple(int(d) for d in extractor.output_shape[1:])
        shard_rows = config.shard_rows or default_shard_rows(feature_shape, config.dtype, config.batch_size)
        packer = ShardPacker(store, shards, wanted.digests, shard_rows, config.compression)
        with running_gc():
            if config.engine == "ray":
                from featcache.ray_engine import compute_shards

                timing, bad = compute_shards(config, folder.root, spec, backbone, precision, missing, packer)
            else:
                timing, bad = compute_batches(config, folder.root, extractor, missing, packer)
        skipped += bad
        bad_paths = {s["path"] for s in bad}
        rows = wanted.select(~np.isin(wanted.file, [i for i, f in enumerate(good) if f.record.path in bad_paths])
                             ) if bad_paths else wanted
        manifest = _manifest(config, folder, spec, settings, fingerprint, rows, skipped, precision, feature_shape)
        runs = 0  # runs of rows the master maps, when this run writes one
        if old is None or missing or len(rows) != old.n_rows or old.skipped_paths != {s["path"] for s in skipped}:
            packer.pack()
            if plain:
                old.unpack(shards, shard_rows, config.compression)  # a compacted cache: its rows go into shards once
            runs = assemble_cache(paths, rows, shards, manifest, store.folder / SAVED_WEIGHTS, _targets(folder))
        elif (store.folder / SAVED_WEIGHTS).exists():
            os.replace(store.folder / SAVED_WEIGHTS, paths.weights)  # an up-to-date cache whose weights were deleted
        store.remove()
    computed = len(missing) - sum(1 for f, _ in missing if f.record.path in bad_paths)
    return ExtractSummary(
        backbone=name, cache_path=paths.final, counts=manifest["counts"], skipped=skipped,
        computed_rows=computed, reused_rows=reused, seconds=time.perf_counter() - started,
        size_bytes=cache_bytes(paths.final),
        timing=timing, feature_shape=tuple(manifest["feature_shape"]), image_size=config.image_size,
        mapped_runs=runs,
    )


def _up_to_date(config: ExtractConfig, spec, memo: WeightsMemo, folder, files, unreadable, started: float
                ) -> ExtractSummary | None:
    """The summary of a rerun with nothing to do, found without building the backbone (``uptodate``): the
    weights hash remembered by an earlier run, and precision told without TensorFlow. None on any doubt."""
    precision = _precision_without_tensorflow(config.precision)
    weights_sha256 = memo.lookup(_memo_key(config, spec, precision)) if precision else None
    if weights_sha256 is None:
        return None
    fingerprint = compute_fingerprint(_feature_settings(config, spec, weights_sha256, precision, folder))
    paths = CachePaths.for_fingerprint(config.cache_dir, spec.name, fingerprint)
    found = nothing_to_do(paths, fingerprint, Path(config.cache_dir) / f".{spec.name}.lock", files, unreadable,
                          config.augment_copies, config.max_pixels, config.weights == "random")
    if found is None:
        return None
    log.info("%s is up to date (weights hash remembered in %s)", paths.final, memo.path)
    return ExtractSummary(
        backbone=spec.name, cache_path=paths.final, counts=found.counts, skipped=found.skipped, computed_rows=0,
        reused_rows=found.reused_rows, seconds=time.perf_counter() - started, size_bytes=cache_bytes(paths.final),
        timing=ComputeTiming(), feature_shape=found.feature_shape, image_size=config.image_size,
    )


def _memo_key(config: ExtractConfig, spec, precision: str) -> dict | None:
    return memo_key(spec.name, config.image_size, config.weights, config.seed, config.feature_layer, precision)


GPU_DEVICE_NODES = ("/dev/nvidia*", "/dev/dxg", "/dev/kfd", "/dev/dri")  # CUDA, WSL, ROCm, other GPU drivers


def _precision_without_tensorflow(requested: str) -> str | None:
    """``_effective_precision`` where it is certain without importing TensorFlow: a requested precision, or
    ``auto`` on a Linux machine with no GPU device node at all (TensorFlow cannot find a GPU there); else None."""
    if requested != "auto":
        return requested
    if not sys.platform.startswith("linux") or any(glob.glob(pattern) for pattern in GPU_DEVICE_NODES):
        return None
    return "float32"


def _effective_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    import tensorflow as tf

    return "mixed" if tf.config.list_physical_devices("GPU") else "float32"


def _feature_settings(config: ExtractConfig, spec, weights_sha256: str, precision: str, folder=None) -> dict:
    """Everything that changes the cached features or what the cache records of each file (label, split,
    patient); hashed into the fingerprint and the file name.

    Keys that only some caches need enter only where they apply: the Keras architecture, a feature layer,
    and with ``folder`` (the ImageFolder) the label file, patient rules and DICOM conversion. The original
    backbones on Kermany folders keep their fingerprints (tests/test_backbone_pins.py).
    """
    settings = {
        "backbone": spec.name,
        "weights_sha256": weights_sha256,
        "image_size": config.image_size,
        "preprocessing": describe_preprocessing(spec),
        "resize": resize_settings(config.decode),
        "augment": config.augment.describe(),
        "seed": config.seed,
        "split": {"method": "patients in sha256(seed, id) order, greedy per class to val_fraction; "
                            "earlier assignments kept (split-seed<S>.json)",
                  "val_fraction": VAL_FRACTION, "patient_pattern": PATIENT_PATTERN},
        "dtype": config.dtype,
        "precision": precision,
    }
    if spec.architecture:
        settings["architecture"] = f"keras.applications.{spec.architecture}"
    if config.feature_layer is not None:
        settings["feature_layer"] = config.feature_layer
    if folder is None:
        return settings
    if folder.patient_rules:
        settings["split"]["patient_rules"] = list(folder.patient_rules)
    if folder.labels is not None:
        settings["labels"] = folder.labels.settings()
        settings["split"]["test"] = "label file 'split' column"
    if folder.dicom:
        settings["dicom"] = DICOM_CONVERSION
    return settings


def _manifest(config, folder, spec, settings, fingerprint, rows, skipped, precision, feature_shape) -> dict:
    import h5py
    import keras
    import tensorflow as tf

    counts = {**rows.counts(), "skipped": len(skipped)}
    weights = {"source": config.weights if config.weights in ("imagenet", "random") else "file",
               "sha256": settings["weights_sha256"],
               "path": None if config.weights in ("imagenet", "random") else str(Path(config.weights).resolve())}
    return {
        "featcache_version": __version__,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "backbone": spec.name,
        "weights": weights,
        "image_size": config.image_size,
        "feature_shape": list(feature_shape),
        **({"feature_layer": config.feature_layer} if config.feature_layer is not None else {}),
        "dtype": config.dtype,
        "precision": precision,
        "preprocessing": settings["preprocessing"],
        "resize": settings["resize"],
        "augment": {**settings["augment"], "copies": config.augment_copies},
        "seed": config.seed,
        "split": settings["split"],
        "class_names": list(folder.class_names),
        **({"task": "multilabel"} if folder.labels is not None and folder.labels.kind == "multilabel" else {}),
        **({"labels": {**settings["labels"], "file": str(Path(folder.labels.path).resolve()),
                       "left_out": len(folder.left_out), "left_out_examples": list(folder.left_out[:10])}}
           if folder.labels is not None else {}),
        "counts": counts,
        "skipped": sorted(_with_split(skipped, folder), key=lambda s: s["path"]),
        "data_dir": str(Path(folder.root).resolve()),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "h5py": h5py.__version__,
                     "numpy": np.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _with_split(skipped: list[dict], folder) -> list[dict]:
    """Label-file data sets: each skipped file's split, so that evaluate can tell the test files apart (class
    folders say it by the path, ``test/...``)."""
    if folder.labels is None:
        return skipped
    split_of = {r.path: r.split for r in folder.records}
    return [{**s, "split": split_of[s["path"]]} if s["path"] in split_of else s for s in skipped]


def format_summary(summary: ExtractSummary) -> str:
    c = summary.counts
    lines = [
        f"{summary.backbone}: {summary.cache_path} ({summary.size_bytes / 2**20:.1f} MiB, {summary.seconds:.1f} s)",
        *([f"  maps {summary.feature_shape} at {summary.image_size} px"] if summary.feature_shape else []),
        f"  originals: train {c['train']}, val {c['val']}, test {c['test']}; augmented copies {c['train_copies']}; "
        f"rows {c['rows']}",
        *([f"  patients: {summary.patients}"] if summary.patients else []),
        *([f"  left out {summary.left_out} label-file rows without a certain label (--uncertain)"]
          if summary.left_out else []),
        f"  computed {summary.computed_rows} rows{_rates(summary)}, reused {summary.reused_rows}",
    ]
    lines += compact_hint(summary.mapped_runs)
    if summary.skipped:
        lines.append(f"  skipped {len(summary.skipped)} unreadable files:")
        lines += [f"    {s['path']}: {s['error']}" for s in summary.skipped]
    return "\n".join(lines)


def _rates(summary: ExtractSummary) -> str:
    """The summary's rates: overall, then after the first batch (a run of one batch or one Ray shard has none)."""
    if not summary.computed_rows:
        return ""
    timing = summary.timing
    steady = timing.steady_rate(summary.computed_rows)
    after = f"{steady:.1f} after a {timing.first_batch_seconds:.1f} s first batch" if steady else "in one batch"
    return f" at {summary.images_per_second:.1f} img/s ({after})"
