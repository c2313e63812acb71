"""Benchmark of ``featcache train-head`` at full scale, and its per-epoch speed-up over the reference method.

1. Writes (once; reused while its fingerprint matches) a full-scale synthetic ResNet152 cache through
   CacheWriter: 5,856 images (4,186 train, 1,046 val, 624 test) + 5 augmented copies of each train
   image = 26,786 rows of 7x7x2048 float16 maps (5.4 GB).
2. Runs ``featcache train-head --trials N`` on it in a fresh subprocess: wall time (interpreter start,
   imports and loading included) and peak RSS.
3. Side by side in this process, one epoch over the 4,186 training images with the reference head
   (128 units, batch 64):
   - cached: ``fit_head`` on the pooled vectors (validation scoring included);
   - reference: the end-to-end model (uint8 image -> preprocessing -> frozen ResNet152 -> same head)
     in ``keras.Model.fit``, timed on a small sample of 224 px images and scaled per image. It is
     charged nothing for decoding or augmentation, which the reference loop also paid.

Reproduce: python benchmarks/bench_train_head.py [--cache-dir /tmp/featcache-bench] [--trials 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

N_TRAIN, N_VAL, N_TEST, COPIES = 4186, 1046, 624, 5
FEATURE_SHAPE = (7, 7, 2048)
CHUNK = 512
SEPARATION = 1.0  # class-mean distance along one direction; noise std there ~0.35


def synthetic_cache_path(cache_dir: Path, settings: dict) -> tuple[Path, str]:
    """The final path and fingerprint of a synthetic ResNet152 cache of these settings; the folder's other
    ResNet152 caches (older settings or format) are deleted, so a benchmark folder holds one."""
    from featcache.cache import CachePaths, compute_fingerprint, list_caches

    fingerprint = compute_fingerprint(settings)
    final = CachePaths.for_fingerprint(cache_dir, "resnet152", fingerprint).final
    for stale in list_caches(cache_dir, "resnet152"):
        if stale != final:
            stale.unlink()
    return final, fingerprint


def write_full_scale_cache(cache_dir: Path, seed: int = 0) -> Path:
    """The synthetic full-scale cache; values are a weak class signal + noise (val AUC well below 1)."""
    from featcache.cache import FORMAT_VERSION
    from featcache.cachewrite import CacheWriter, FileTable

    settings = {"benchmark": "train-head", "seed": seed, "n": [N_TRAIN, N_VAL, N_TEST, COPIES], "v": 2,
                "format_version": FORMAT_VERSION}  # a cache of an older format is written again
    final, fingerprint = synthetic_cache_path(cache_dir, settings)
    if final.is_file():
        return final
    rng = np.random.default_rng(seed)
    split = np.repeat([0, 1, 2], [N_TRAIN, N_VAL, N_TEST]).astype(np.uint8)
    label = (rng.random(len(split)) >= 0.27).astype(np.int16)  # ~27 % NORMAL, as in Kermany
    folder = np.where(split == 2, "test", "train")  # val is drawn from train/ by patient, so interleaved
    paths = [f"{f}/{'PNEUMONIA' if y else 'NORMAL'}/img{i:05d}.jpeg" for i, (f, y) in enumerate(zip(folder, label))]
    order = np.argsort(paths, kind="stable")
    table = FileTable([paths[i] for i in order], [f"{i:064x}" for i in order], label[order], split[order],
                      [f"p{i}" for i in order])
    rows = np.array([(f, k) for f in range(len(table)) for k in range(COPIES + 1 if table.split[f] == 0 else 1)])
    c = FEATURE_SHAPE[-1]
    direction = rng.normal(size=c).astype(np.float32) / np.sqrt(c)
    image_mean = rng.gamma(2.0, 0.25, size=(len(table), c)).astype(np.float32)
    image_mean += SEPARATION * np.outer(table.label - 0.5, direction).astype(np.float32)
    pattern = rng.normal(size=FEATURE_SHAPE).astype(np.float32)
    pattern -= pattern.mean(axis=(0, 1))
    writer = CacheWriter(final, table, len(rows), FEATURE_SHAPE, "float16")
    for start in range(0, len(rows), CHUNK):
        part = rows[start:start + CHUNK]
        pooled = image_mean[part[:, 0]] + 0.1 * (part[:, 1:] > 0) * rng.normal(size=(len(part), c)).astype(np.float32)
        maps = pooled[:, None, None, :] + 0.2 * pattern
        writer.write_rows(start, maps.astype(np.float16), maps.mean(axis=(1, 2)), labels=table.label[part[:, 0]],
                          split=table.split[part[:, 0]], source_index=part[:, 0].astype(np.int32),
                          copy_index=part[:, 1].astype(np.int16))
    counts = {"train": N_TRAIN, "val": N_VAL, "test": N_TEST, "train_copies": N_TRAIN * COPIES, "rows": len(rows)}
    return writer.commit({
        "fingerprint": fingerprint, "backbone": "resnet152", "class_names": ["NORMAL", "PNEUMONIA"],
        "image_size": 224, "feature_shape": list(FEATURE_SHAPE), "dtype": "float16",
        "format_version": FORMAT_VERSION, "counts": counts, "weights": {"source": "synthetic", "sha256": "0" * 64},
        "seed": seed, "synthetic": settings,
    })


def run_cli(cache_dir: Path, trials: int) -> tuple[float, float, str]:
    """Fresh study: (wall seconds, peak RSS GiB, output) of one ``featcache train-head`` subprocess."""
    shutil.rmtree(cache_dir / "runs", ignore_errors=True)
    # The child reports its own VmHWM: getrusage's ru_maxrss survives fork+exec on Linux, so
    # RUSAGE_CHILDREN would report this (large, cache-writing) parent's peak instead.
    argv = ["featcache", "train-head", "--cache-dir", str(cache_dir), "--backbone", "resnet152",
            "--trials", str(trials), "--no-progress"]
    code = (f"import runpy, sys; sys.argv = {argv!r}\n"
            "try:\n    runpy.run_module('featcache', run_name='__main__')\n"
            "finally:\n    print('VmHWM', [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1],"
            " file=sys.stderr)")
    command = [sys.executable, "-c", code]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"train-head failed ({done.returncode}):\n{done.stderr}")
    peak = int(done.stderr.rsplit("VmHWM", 1)[1].split()[0]) / 2**20  # KiB -> GiB
    return wall, peak, done.stdout


def cached_epoch_seconds(cache_path: Path, epochs: int = 8) -> float:
    """Median seconds of one epoch of fit_head (4,186 views + validation scoring), first epoch excluded."""
    import keras
    import tensorflow as tf

    from featcache.head import HeadParams, TrainViews, build_head, fit_head
    from featcache.tune import load_head_data

    data = load_head_data(cache_path)
    train = TrainViews(tf.convert_to_tensor(data.train.pooled), data.train.labels, data.train.source_index)
    stamps = []
    keras.utils.set_random_seed(0)
    params = HeadParams()
    models = build_head(FEATURE_SHAPE, params)
    fit_head(models, train, data.val_pooled, data.val_labels, params, seed=0, max_epochs=epochs, patience=epochs,
             on_epoch=lambda epoch, scores: stamps.append(time.perf_counter()) and False)
    return float(np.median(np.diff(stamps)))


def reference_epoch_seconds(sample: int, batch_size: int = 8) -> tuple[float, float]:
    """(seconds per image, seconds per 4,186-image epoch) of the end-to-end model in keras fit."""
    import keras

    from featcache.backbones import BACKBONES, build_extractor, load_backbone
    from featcache.head import HeadParams, build_head

    spec = BACKBONES["resnet152"]
    backbone = load_backbone(spec, 224, "random", seed=0)  # weights=None; speed is the same as ImageNet's
    extractor = build_extractor(spec, backbone, 224)
    head = build_head(FEATURE_SHAPE, HeadParams()).maps
    model = keras.Model(extractor.input, head(extractor.output))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(sample, 224, 224, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, size=(sample, 1)).astype(np.float32)
    model.fit(images[:batch_size], labels[:batch_size], batch_size=batch_size, epochs=1, verbose=0)  # trace
    started = time.perf_counter()
    model.fit(images, labels, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
    per_image = (time.perf_counter() - started) / sample
    return per_image, per_image * N_TRAIN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/featcache-bench"))
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--reference-images", type=int, default=32, help="Sample size of the reference side.")
    args = parser.parse_args()

    started = time.perf_counter()
    cache_path = write_full_scale_cache(args.cache_dir)
    print(f"cache {cache_path} ({cache_path.stat().st_size / 2**30:.2f} GiB, ready in "
          f"{time.perf_counter() - started:.0f} s)")
    wall, peak, output = run_cli(args.cache_dir, args.trials)
    print(output.rstrip())
    cached = cached_epoch_seconds(cache_path)
    per_image, reference = reference_epoch_seconds(args.reference_images)
    print(f"\n{'measure':<44} {'measured':>12} {'target':>10}")
    print(f"{f'train-head --trials {args.trials} wall (s)':<44} {wall:>12.1f} {'<= 60':>10}")
    print(f"{'train-head peak RSS (GiB)':<44} {peak:>12.2f} {'<= 2':>10}")
    print(f"{'cached epoch, 4,186 views (s)':<44} {cached:>12.4f}")
    print(f"{'reference per image (s)':<44} {per_image:>12.3f}")
    print(f"{'reference epoch, 4,186 images (s, scaled)':<44} {reference:>12.1f}")
    print(f"{'per-epoch speed-up (reference / cached)':<44} {reference / cached:>12.0f}x {'>= 500x':>9}")
    print(f"\ncpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}; reproduce: "
          f"python benchmarks/bench_train_head.py --cache-dir {args.cache_dir} --trials {args.trials} "
          f"--reference-images {args.reference_images}")


if __name__ == "__main__":
    main()
