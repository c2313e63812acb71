"""Benchmark of ``featcache train-head`` in bounded memory: streamed from a cache far larger than the budget,
side by side with the in-memory path.

1. Writes (once; reused while its fingerprint matches) a synthetic cache of ROWS rows of 2048-d vectors through
   CacheWriter, as ``extract`` writes one: the maps are 1x1x2048 float16 so that /features is no larger than
   /pooled (1,000,000 rows: 4 GB of maps + 8 GB of pooled float32). The images keep the proportions of the
   full-scale Kermany cache (train/val/test 71.5/17.9/10.7 % of the images, 5 augmented copies of each
   train image), so a million rows are 156,250 train images (937,500 rows), 39,000 val and 23,500 test images.
2. Runs ``train-head --trials N`` on it in a fresh subprocess, once streamed (``--memory-budget`` at its default)
   and once loaded whole (a budget above the cache), each with its own fresh study: peak RSS (the child's
   VmHWM), wall time and the median seconds of one epoch (from the trials' recorded epochs and seconds, and
   from per-epoch stamps the child logs).
   The in-memory path holds the train+val rows about three times (about 22 GiB at a million rows), more than
   this 24 GB machine (shared) can give, so ``--compare-rows`` names a smaller cache built the same way on which
   both paths run: the per-epoch ratio is measured there, and the million-row run is streamed only.

Reproduce: python benchmarks/bench_train_head_stream.py [--dir /tmp/featcache-stream] [--rows 1000000]
           [--compare-rows 250000] [--trials 5] [--max-epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_train_head import synthetic_cache_path  # beside this script: its folder is on sys.path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FEATURE_SHAPE = (1, 1, 2048)
COPIES = 5
FRACTIONS = (4186, 1046, 624)  # train, val, test images of the full-scale Kermany cache
SEPARATION = 1.0
FILES_PER_WRITE = 1024


def split_counts(rows: int) -> tuple[int, int, int]:
    """(train, val, test) images whose rows (train images have 1 + COPIES) add up to about ``rows``."""
    per_unit = FRACTIONS[0] * (COPIES + 1) + FRACTIONS[1] + FRACTIONS[2]
    train, val = (round(rows * f / per_unit) for f in FRACTIONS[:2])
    test = max(1, rows - train * (COPIES + 1) - val)
    return train, val, test


def write_cache(cache_dir: Path, rows: int, seed: int = 0) -> Path:
    """The synthetic cache of about ``rows`` rows (exactly, when the split counts allow), written once."""
    from featcache.cache import FORMAT_VERSION
    from featcache.cachewrite import CacheWriter, FileTable

    n_train, n_val, n_test = split_counts(rows)
    settings = {"benchmark": "train-head-stream", "seed": seed, "n": [n_train, n_val, n_test, COPIES], "v": 1,
                "format_version": FORMAT_VERSION}
    final, fingerprint = synthetic_cache_path(cache_dir, settings)
    if final.is_file():
        return final
    rng = np.random.default_rng(seed)
    split = np.repeat([0, 1, 2], [n_train, n_val, n_test]).astype(np.uint8)
    label = (rng.random(len(split)) >= 0.27).astype(np.int16)
    folder = np.where(split == 2, "test", "train")  # val is drawn from train/ by patient, so interleaved
    paths = [f"{f}/{'PNEUMONIA' if y else 'NORMAL'}/img{i:07d}.jpeg" for i, (f, y) in enumerate(zip(folder, label))]
    order = np.argsort(paths, kind="stable")
    table = FileTable([paths[i] for i in order], [f"{i:064x}" for i in order], label[order], split[order],
                      [f"p{i}" for i in order])
    views = np.where(table.split == 0, COPIES + 1, 1)
    c = FEATURE_SHAPE[-1]
    direction = rng.normal(size=c).astype(np.float32) / np.sqrt(c)
    writer = CacheWriter(final, table, int(views.sum()), FEATURE_SHAPE, "float16")
    start = 0
    for first in range(0, len(table), FILES_PER_WRITE):  # every view of an image in the same write
        files = np.arange(first, min(first + FILES_PER_WRITE, len(table)))
        image_mean = rng.gamma(2.0, 0.25, size=(len(files), c)).astype(np.float32)
        image_mean += SEPARATION * np.outer(table.label[files] - 0.5, direction).astype(np.float32)
        file_of_row = np.repeat(files, views[files])
        copy = np.concatenate([np.arange(views[f]) for f in files]).astype(np.int16)
        noise = rng.standard_normal((len(file_of_row), c), dtype=np.float32)
        pooled = image_mean[file_of_row - first] + 0.1 * (copy > 0)[:, None] * noise
        maps = pooled.astype(np.float16).reshape(len(pooled), *FEATURE_SHAPE)
        writer.write_rows(start, maps, maps.astype(np.float32).mean(axis=(1, 2)), labels=table.label[file_of_row],
                          split=table.split[file_of_row], source_index=file_of_row.astype(np.int32),
                          copy_index=copy)
        start += len(file_of_row)
    counts = {"train": n_train, "val": n_val, "test": n_test, "train_copies": n_train * COPIES, "rows": start,
              "skipped": 0}
    return writer.commit({
        "fingerprint": fingerprint, "backbone": "resnet152", "class_names": ["NORMAL", "PNEUMONIA"],
        "image_size": 32, "feature_shape": list(FEATURE_SHAPE), "dtype": "float16",
        "format_version": FORMAT_VERSION, "counts": counts, "weights": {"source": "synthetic", "sha256": "0" * 64},
        "seed": seed, "synthetic": settings,
    })


def run_train_head(path: Path, trials: int, max_epochs: int, budget: str) -> dict:
    """A fresh study in a fresh subprocess: wall seconds, peak RSS (GiB), seconds per epoch, the summary."""
    shutil.rmtree(path.parent / "runs", ignore_errors=True)
    code = (
        "import logging, sys, time\n"
        "from pathlib import Path\n"
        "from featcache.tflog import quiet_tensorflow_startup\n"
        "quiet_tensorflow_startup()\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from featcache.config import TrainHeadConfig, parse_memory_budget\n"
        "from featcache.tune import format_summary, train_heads\n"
        f"path = Path({str(path)!r})\n"
        "try:\n"
        f"    config = TrainHeadConfig(cache=path, cache_dir=path.parent, trials={trials}, max_epochs={max_epochs},\n"
        f"                             memory_budget=parse_memory_budget({budget!r}), progress=False)\n"
        "    (summary,) = train_heads(config)\n"
        "    print(format_summary(summary))\n"
        "finally:\n"
        "    print('VmHWM', [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1],"
        " file=sys.stderr)\n")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"train-head failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (path.parent / "runs" / path.stem / "trials.jsonl").read_text().splitlines()]
    return {"wall": wall, "peak": int(done.stderr.rsplit("VmHWM", 1)[1].split()[0]) / 2**20,
            "epoch": sum(r["seconds"] for r in rows) / sum(r["epochs"] for r in rows),
            "epochs": sum(r["epochs"] for r in rows), "output": done.stdout.rstrip(),
            "trials": [{k: v for k, v in r.items() if k != "seconds"} for r in rows],
            "log": [line for line in done.stderr.splitlines() if "training views" in line]}


def stream_read_seconds(path: Path, budget: str, repeats: int = 2) -> tuple[float, int]:
    """(seconds, windows) of reading one epoch's windows (batch 64) through the stream, without training: what
    streaming adds to an epoch when no core is free to overlap it. The best of ``repeats``."""
    from featcache.config import parse_memory_budget
    from featcache.head import epoch_windows
    from featcache.views import load_head_data

    data = load_head_data(path, parse_memory_budget(budget))
    windows = epoch_windows(data.train.source_index, 64, np.random.default_rng(0), data.train.layout)
    best = np.inf
    for _ in range(repeats):
        started = time.perf_counter()
        for _views in data.train.stream(windows):
            pass
        best = min(best, time.perf_counter() - started)
    return best, len(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/featcache-stream"))
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--compare-rows", type=int, default=250_000)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--max-epochs", type=int, default=4)
    parser.add_argument("--budget", default="1GiB", help="--memory-budget of the streamed runs (the default)")
    parser.add_argument("--skip-large", action="store_true", help="Only the side-by-side comparison.")
    args = parser.parse_args()

    results = {}
    for rows in ([] if args.skip_large else [args.rows]) + [args.compare_rows]:
        started = time.perf_counter()
        path = write_cache(args.dir / f"rows{rows}", rows)
        print(f"cache {path} ({path.stat().st_size / 2**30:.2f} GiB, ready in {time.perf_counter() - started:.0f} s)",
              flush=True)
        modes = [("streamed", args.budget)] + ([("in memory", "1TiB")] if rows == args.compare_rows else [])
        for mode, budget in modes:
            result = results[rows, mode] = run_train_head(path, args.trials, args.max_epochs, budget)
            print(f"\n--- {rows:,} rows, {mode} (--memory-budget {budget}): {' '.join(result['log'])}\n"
                  f"{result['output']}", flush=True)
    print(f"\n{'cache rows':>10} {'path':<10} {'peak RSS GiB':>12} {'s/epoch':>8} {'epochs':>6} {'wall s':>7}")
    for (rows, mode), r in results.items():
        print(f"{rows:>10,} {mode:<10} {r['peak']:>12.2f} {r['epoch']:>8.2f} {r['epochs']:>6} {r['wall']:>7.0f}")
    pair = results.get((args.compare_rows, "streamed")), results.get((args.compare_rows, "in memory"))
    if all(pair):
        print(f"per-epoch ratio streamed / in memory at {args.compare_rows:,} rows: {pair[0]['epoch'] / pair[1]['epoch']:.2f}"
              f" (target <= 1.5); peak RSS ratio {pair[0]['peak'] / pair[1]['peak']:.2f}; same trials (parameters, "
              f"epochs, every metric): {'yes' if pair[0]['trials'] == pair[1]['trials'] else 'NO'}")
    if pair[0] is not None:
        seconds, windows = stream_read_seconds(write_cache(args.dir / f"rows{args.compare_rows}", args.compare_rows),
                                               args.budget)
        print(f"reading one epoch's {windows} windows alone (no training) at {args.compare_rows:,} rows: {seconds:.2f} s")
    print(f"\ncpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}; reproduce: python "
          f"benchmarks/bench_train_head_stream.py --dir {args.dir} --rows {args.rows} --compare-rows "
          f"{args.compare_rows} --trials {args.trials} --max-epochs {args.max_epochs} --budget {args.budget}")


def main_build(args) -> None:
    for rows in args.build:
        started = time.perf_counter()
        path = write_cache(args.dir / f"rows{rows}", rows)
        print(f"cache {path} ({path.stat().st_size / 2**30:.2f} GiB, ready in {time.perf_counter() - started:.0f} s)",
              flush=True)


if __name__ == "__main__" and "--build" in sys.argv:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path("/tmp/featcache-stream"))
    parser.add_argument("--build", type=int, nargs="+")
    main_build(parser.parse_args())
elif __name__ == "__main__":
    main()
