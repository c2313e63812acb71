"""The prepared GPU run (issue 9, part 5): extract over a full-size Kermany layout with every engine and
precision, side by side, and the parity of a mixed-precision cache.

For each backbone, engine (local; ray when the Ray engine is installed) and precision (float32, mixed):
a fresh ``featcache extract`` process into an empty cache folder, on the same images. Printed per run: rows,
wall seconds, the backbone's steady rows/s (from extract's own summary), peak RSS. Then, per backbone, the
ratios side by side (ray / local, mixed / float32) and the largest difference between the mixed and the
float32 pooled vectors; and for the mixed-precision cache the end-to-end parity of ``featcache evaluate``
(``train-head --trials 1`` first): the float32 SavedModel path on raw test files against the head on the
mixed cache's maps.

The data is a full-size Kermany layout (5,856 images: 5,232 train, 624 test) made of the dev images repeated
under new names, with 5 augmented copies of each training image: 26,786 rows per cache, as the benchmark
cache of ``bench_train_head``. On this 2-core CPU the same script runs on a subset, to be known to work:

Reproduce:
    python benchmarks/bench_gpu.py                                    # a GPU machine: both backbones, 224 px
    python benchmarks/bench_gpu.py --images 24 --copies 1 --backbone vgg16 --image-size 64 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
DEV = Path(os.environ.get("FEATCACHE_SHARED_DATA", REPO.parent / "shared" / "data")) / "chest_xray_dev"
KERMANY = {"train": 5232, "test": 624}  # the reference set: 5,856 labelled images
PNEUMONIA_SHARE = {"train": 3875 / 5216, "test": 390 / 624}


def make_layout(target: Path, images: int) -> dict:
    """A Kermany layout of ``images`` files (train:test and class shares as the reference set's), the dev images
    repeated under new names. Returns the counts per split and class."""
    counts = {}
    for split, full in KERMANY.items():
        n_split = round(images * full / sum(KERMANY.values()))
        for cls in ("NORMAL", "PNEUMONIA"):
            share = PNEUMONIA_SHARE[split] if cls == "PNEUMONIA" else 1 - PNEUMONIA_SHARE[split]
            n = max(2, round(n_split * share))
            sources = sorted((DEV / split / cls).iterdir()) or sorted((DEV / "train" / cls).iterdir())
            folder = target / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                source = sources[i % len(sources)]
                copy = folder / f"dup{i // len(sources)}_{source.name}"
                if source.stat().st_dev == folder.stat().st_dev:
                    os.link(source, copy)
                else:
                    shutil.copyfile(source, copy)
            counts[f"{split}/{cls}"] = n
    return counts


def engines_available() -> list[str]:
    """local always; ray when this featcache has the engine and Ray is importable."""
    help_text = subprocess.run([sys.executable, "-m", "featcache", "extract", "--help"], capture_output=True,
                               text=True).stdout
    engines = ["local"]
    if "--engine" in help_text:
        try:
            import ray  # noqa: F401  (only whether it imports)
            engines.append("ray")
        except ImportError:
            pass
    return engines


def run(argv: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GiB, stdout) of one featcache command in a fresh interpreter."""
    code = (f"import runpy, sys; sys.argv = {argv!r}\n"
            "try:\n    runpy.run_module('featcache', run_name='__main__')\n"
            "finally:\n    print('VmHWM', [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1],"
            " file=sys.stderr)")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    peak = int(done.stderr.rsplit("VmHWM", 1)[1].split()[0]) / 2**20
    return wall, peak, done.stdout


def extract(data: Path, cache_dir: Path, backbone: str, engine: str, precision: str, args) -> dict:
    argv = ["featcache", "extract", "--data", str(data), "--cache-dir", str(cache_dir), "--backbone", backbone,
            "--weights", args.weights, "--image-size", str(args.image_size), "--augment-copies", str(args.copies),
            "--batch-size", str(args.batch_size), "--precision", precision, "--no-progress"]
    if engine != "local":
        argv += ["--engine", engine] + (["--ray-actors", str(args.ray_actors)] if args.ray_actors else [])
    wall, peak, out = run(argv)
    computed = re.search(r"computed (\d+) rows at ([\d.]+) img/s \(([\d.]+) after", out)
    if not computed:
        raise SystemExit(f"no 'computed ... rows' line in extract's output:\n{out}")
    cache = next(p for p in cache_dir.glob(f"{backbone}-*.h5") if not p.name.endswith(".weights.h5"))
    return {"backbone": backbone, "engine": engine, "precision": precision, "rows": int(computed.group(1)),
            "wall_s": wall, "rows_per_s": float(computed.group(2)), "steady_rows_per_s": float(computed.group(3)),
            "peak_gib": peak, "cache": str(cache)}


def pooled(cache: str) -> np.ndarray:
    import h5py

    with h5py.File(cache, "r") as handle:
        return handle["pooled"][...]


def mixed_parity(cache_dir: Path, backbone: str, data: Path) -> str:
    """evaluate's parity on a mixed-precision cache (after a one-trial head), from its report.json."""
    run(["featcache", "train-head", "--cache-dir", str(cache_dir), "--backbone", backbone, "--trials", "1",
         "--no-progress"])
    run(["featcache", "evaluate", "--cache-dir", str(cache_dir), "--data", str(data), "--backbone", backbone,
         "--bootstrap", "100", "--no-progress"])
    report = next((cache_dir / "runs").glob(f"{backbone}-*/report.json"))
    parity = json.loads(report.read_text())["parity"]
    return (f"{parity['images']} test images, cache {parity['cache_precision']} {parity['cache_dtype']}: max "
            f"|end-to-end - cached| {parity['max_abs_diff']:.3g} (tolerance {parity['tolerance']:g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=sum(KERMANY.values()), help="images in the layout")
    parser.add_argument("--copies", type=int, default=5, help="augmented copies of each training image")
    parser.add_argument("--backbone", action="append", help="default: vgg16 and resnet152")
    parser.add_argument("--engine", action="append", help="default: every available (local, ray)")
    parser.add_argument("--precision", action="append", help="default: float32 and mixed")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ray-actors", type=int, default=0, help="CPU actors of the Ray engine (0: its default)")
    parser.add_argument("--weights", default="random", help="random (seeded), imagenet, or a weights file")
    parser.add_argument("--work", type=Path, help="folder for the data and caches (default: a temporary one)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    backbones = args.backbone or ["vgg16", "resnet152"]
    engines = args.engine or engines_available()
    precisions = args.precision or ["float32", "mixed"]
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    print(f"devices: {len(gpus)} GPU(s) {[g.name for g in gpus]}; {os.cpu_count()} CPU cores; engines {engines}")
    work = args.work or Path(tempfile.mkdtemp(prefix="featcache-gpu-"))
    data = work / "data"
    if not data.is_dir():
        counts = make_layout(data, args.images)
        print(f"layout {data}: {counts}")
    results, parity = [], {}
    for backbone in backbones:
        for engine in engines:
            for precision in precisions:
                cache_dir = work / f"cache-{backbone}-{engine}-{precision}"
                shutil.rmtree(cache_dir, ignore_errors=True)
                result = extract(data, cache_dir, backbone, engine, precision, args)
                results.append(result)
                print(f"{backbone:<10} {engine:<6} {precision:<8} rows {result['rows']:>6}  wall {result['wall_s']:8.1f} s  "
                      f"{result['rows_per_s']:8.1f} rows/s (steady {result['steady_rows_per_s']:.1f})  "
                      f"peak {result['peak_gib']:.2f} GiB", flush=True)
        if "mixed" in precisions:
            mixed_dir = work / f"cache-{backbone}-local-mixed"
            if mixed_dir.is_dir():
                parity[backbone] = mixed_parity(mixed_dir, backbone, data)
    print("\nside by side (same images, same process order)")
    for backbone in backbones:
        by = {(r["engine"], r["precision"]): r for r in results if r["backbone"] == backbone}
        for precision in precisions:
            if ("ray", precision) in by and ("local", precision) in by:
                ratio = by["ray", precision]["rows_per_s"] / by["local", precision]["rows_per_s"]
                print(f"{backbone}: ray / local rows/s at {precision}: {ratio:.2f} (target >= 0.8)")
        for engine in engines:
            if (engine, "mixed") in by and (engine, "float32") in by:
                ratio = by[engine, "mixed"]["rows_per_s"] / by[engine, "float32"]["rows_per_s"]
                diff = np.abs(pooled(by[engine, "mixed"]["cache"]) - pooled(by[engine, "float32"]["cache"])).max()
                print(f"{backbone}: mixed / float32 rows/s ({engine}): {ratio:.2f}; max |pooled mixed - float32| "
                      f"{diff:.3g}")
        if backbone in parity:
            print(f"{backbone}: mixed-precision cache, evaluate: {parity[backbone]}")
    if args.out:
        args.out.write_text(json.dumps({"results": results, "parity": parity}, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
