"""Benchmark of ``featcache evaluate``'s memory: its peak RSS must not grow with the test set.

1. Builds (once; reused) under --work-dir a synthetic Kermany-layout folder of 1,024 px grey JPEGs (a
   gradient, low-frequency blobs and a little noise; brighter for PNEUMONIA): --train train images and
   max(--sizes) test images. Each size gets its own data folder whose test/ holds the first N test images
   (hard links, so the files are shared) beside the same train/.
2. For each size: ``featcache extract --backbone tiny --weights random --image-size 64 --augment-copies 0``
   and ``featcache train-head --trials 1`` (no-ops when already done).
3. Side by side, sizes alternated over --rounds: ``featcache evaluate`` (default --bootstrap 1000 and
   --batch-size 32) in a fresh subprocess, which reports its own peak RSS (VmHWM from /proc/self/status,
   read as it exits; RUSAGE_CHILDREN would carry this parent's peak across fork+exec) and its wall time.
   Prints both and the ratio of the largest size's peak to the smallest's (target <= 1.2x).

The subprocesses import featcache from this checkout; --src DIR runs another source tree instead (e.g. an
older commit: ``git archive <rev> featcache | tar -x -C DIR``), for a before/after comparison.

Reproduce: python benchmarks/bench_evaluate_memory.py [--sizes 500 5000] [--work-dir /tmp/featcache-bench-eval]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIDE = 1024
CLASSES = ("NORMAL", "PNEUMONIA")
FAST = ["--backbone", "tiny", "--weights", "random", "--image-size", "64", "--augment-copies", "0", "--no-progress"]


def make_image(rng: np.random.Generator, label: int, noise: np.ndarray):
    """A 1,024 px grey X-ray stand-in that compresses like one (~140 KB as JPEG); ``noise`` is a shared
    (SIDE, SIDE) float32 bank, rolled by a random offset (drawing fresh noise would triple the cost)."""
    from PIL import Image

    blobs = Image.fromarray(rng.normal(128, 40, (16, 16)).clip(0, 255).astype(np.uint8)).resize((SIDE, SIDE),
                                                                                                 Image.BILINEAR)
    gradient = np.linspace(-30, 30, SIDE, dtype=np.float32)[None, :]
    shifted = np.roll(noise, tuple(rng.integers(0, SIDE, 2)), axis=(0, 1))
    pixels = np.asarray(blobs, np.float32) + gradient + 25 * label + shifted
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="L")


def build_images(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """root/all/{train,test}/<class>/*.jpeg; files already there are kept (a larger n adds the rest)."""
    noise = np.random.default_rng(seed).normal(0, 4, (SIDE, SIDE)).astype(np.float32)
    for split, count in (("train", n_train), ("test", n_test)):
        for i in range(count):
            label = i % 2
            name = f"person{i}_{split}.jpeg" if split == "train" else f"IM-{i:05d}.jpeg"
            path = root / "all" / split / CLASSES[label] / name
            if path.is_file():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            image = make_image(np.random.default_rng([seed, i, split == "test"]), label, noise)
            image.save(path.with_suffix(".tmp"), format="JPEG", quality=85)
            path.with_suffix(".tmp").rename(path)
    return root / "all"


def data_folder(root: Path, full: Path, n_test: int) -> Path:
    """root/data-<n>: every train image and the first n test images, hard-linked from ``full``."""
    target = root / f"data-{n_test}"
    wanted = sorted((full / "train").rglob("*.jpeg"))
    wanted += sorted((full / "test").rglob("*.jpeg"), key=lambda p: p.name)[:n_test]
    for source in wanted:
        link = target / source.relative_to(full)
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, link)
    return target


def featcache(args: list, src: Path, measure: bool = False) -> tuple[float, float | None, str]:
    """Run one featcache command in a fresh interpreter: (wall seconds, peak RSS MiB or None, stdout)."""
    argv = ["featcache", *[str(a) for a in args]]
    code = f"import runpy, sys; sys.argv = {argv!r}\n"
    code += ("try:\n    runpy.run_module('featcache', run_name='__main__')\n"
             "finally:\n    print('VmHWM', [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1],"
             " file=sys.stderr)" if measure else "runpy.run_module('featcache', run_name='__main__')")
    # The child runs in a neutral folder (``python -c`` puts its working folder first on sys.path), so the
    # featcache it imports is ``src``: this checkout unless --src says otherwise.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"featcache {' '.join(argv[1:3])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    peak = int(done.stderr.rsplit("VmHWM", 1)[1].split()[0]) / 1024 if measure else None  # KiB -> MiB
    return wall, peak, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/featcache-bench-eval"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 5000], help="Test images of each run.")
    parser.add_argument("--train", type=int, default=40, help="Train images (both classes; 20 %% go to validation).")
    parser.add_argument("--rounds", type=int, default=1, help="Evaluate runs per size, sizes alternated.")
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1],
                        help="featcache source tree to run (default: this checkout).")
    args = parser.parse_args()
    sizes = sorted(args.sizes)

    started = time.perf_counter()
    full = build_images(args.work_dir, args.train, sizes[-1])
    megabytes = sum(p.stat().st_size for p in (full / "test").rglob("*.jpeg")) / 2**20
    print(f"images: {args.train} train, {sizes[-1]} test at {SIDE} px ({megabytes:.0f} MiB of test JPEGs), ready in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    caches = {}
    for n in sizes:
        data, caches[n] = data_folder(args.work_dir, full, n), args.work_dir / f"cache-{n}"
        wall, _, _ = featcache(["extract", "--data", data, "--cache-dir", caches[n], *FAST], args.src)
        wall_head, _, _ = featcache(["train-head", "--cache-dir", caches[n], "--trials", 1, "--no-progress"], args.src)
        print(f"{n} test images: extract {wall:.0f} s, train-head {wall_head:.0f} s", flush=True)

    _, _, usage = featcache(["evaluate", "--help"], args.src)
    quiet = ["--no-progress"] if "--no-progress" in usage else []  # older featcaches had no evaluate bar
    results: dict[int, list[tuple[float, float]]] = {n: [] for n in sizes}
    for _ in range(args.rounds):
        for n in sizes:
            wall, peak, out = featcache(["evaluate", "--cache-dir", caches[n], *quiet], args.src, measure=True)
            results[n].append((wall, peak))
            print(f"evaluate, {n} test images: {wall:.1f} s, peak RSS {peak:.0f} MiB | {out.splitlines()[0]}",
                  flush=True)

    print(f"\n{'test images':>12} {'peak RSS (MiB)':>15} {'wall (s)':>9} {'s / 1,000 images':>17}")
    for n in sizes:
        wall, peak = min(w for w, _ in results[n]), max(p for _, p in results[n])
        print(f"{n:>12,} {peak:>15.0f} {wall:>9.1f} {1000 * wall / n:>17.1f}")
    small, large = (max(p for _, p in results[n]) for n in (sizes[0], sizes[-1]))
    print(f"\npeak RSS ratio {sizes[-1]:,} / {sizes[0]:,} images: {large / small:.3f}x (target <= 1.2x)")
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}; reproduce: python "
          f"benchmarks/bench_evaluate_memory.py --work-dir {args.work_dir} --sizes {' '.join(map(str, sizes))} "
          f"--train {args.train} --rounds {args.rounds} --src {args.src}")


if __name__ == "__main__":
    main()
