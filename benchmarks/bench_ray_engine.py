"""``extract --engine ray`` against ``--engine local`` on the same images, side by side on this machine.

Each round extracts the same folder into fresh cache folders: once with the local engine, then with the
Ray engine (``--ray-actors N`` CPU actors on a local ``ray.init(num_cpus=CPUS)``), decoding fused into the
actors and decoding in separate Ray tasks. Printed per run: whole-call wall time, rows/s of the compute
phase (``ExtractSummary.timing``: for Ray it includes starting the actors, i.e. importing TensorFlow and
building the backbone in each), and the steady rows/s after the first batch (local) or first shard (Ray).
Features are checked equal to the local engine's (same datasets, same file name). Target: Ray steady
rows/s >= 0.8 x local.

Reproduce (about 5 min on 2 busy cores):
    PYTHONPATH=$PWD python benchmarks/bench_ray_engine.py
    PYTHONPATH=$PWD python benchmarks/bench_ray_engine.py --backbone tiny --image-size 64 --rounds 2
    PYTHONPATH=$PWD python benchmarks/bench_ray_engine.py --backbone vgg16 --image-size 224 --decode-in actor \
        --shard-rows 256   # a real backbone: the actors' start is a small part of the call (about 8 min)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
DEV = Path(os.environ.get("FEATCACHE_SHARED_DATA", REPO.parent / "shared" / "data")) / "chest_xray_dev"


def run(config, label: str) -> dict:
    from featcache.extract import extract_features

    started = time.perf_counter()
    (summary,) = extract_features(config)
    wall = time.perf_counter() - started
    rows = summary.computed_rows
    result = {"label": label, "rows": rows, "wall_s": wall, "compute_rate": summary.timing.rate(rows),
              "steady_rate": summary.timing.steady_rate(rows), "first_s": summary.timing.first_batch_seconds,
              "cache": summary.cache_path}
    print(f"{label:<22} {rows:5d} rows  wall {wall:6.1f} s  compute {result['compute_rate']:6.1f} rows/s  "
          f"steady {result['steady_rate']:6.1f} rows/s (first batch/shard {result['first_s']:.1f} s)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenetv2")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--augment-copies", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-rows", type=int, default=64, help="small shards: many actor calls")
    parser.add_argument("--ray-actors", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="ray.init(num_cpus=...)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--decode-in", default="actor,tasks", help="where Ray decodes: actor, tasks or both")
    args = parser.parse_args()

    import ray
    from conftest import assert_same_datasets

    import featcache.ray_engine as ray_engine
    from featcache.config import ExtractConfig

    work = Path(tempfile.mkdtemp(prefix="fc-bench-ray-"))
    settings = dict(data_dir=DEV, backbones=(args.backbone,), weights="random", image_size=args.image_size,
                    augment_copies=args.augment_copies, batch_size=args.batch_size, shard_rows=args.shard_rows,
                    precision="float32", progress=False)
    print(f"{DEV}: {args.backbone} at {args.image_size} px, K={args.augment_copies}, batch {args.batch_size}, "
          f"shards of {args.shard_rows} rows, {args.ray_actors} Ray actors on ray.init(num_cpus={args.cpus}); "
          f"{os.cpu_count()} cores", flush=True)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    results = []
    try:
        for r in range(args.rounds):
            local = run(ExtractConfig(**settings, cache_dir=work / f"local{r}"), "local")
            results.append(local)
            for decode in args.decode_in.split(","):
                ray_engine.DECODE_ON_CPU_CLUSTERS = decode
                result = run(ExtractConfig(**settings, cache_dir=work / f"ray-{decode}{r}", engine="ray",
                                           ray_actors=args.ray_actors), f"ray, decode in {decode}")
                assert result["cache"].name == local["cache"].name
                assert_same_datasets(local["cache"], result["cache"])
                results.append(result)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print("features: every Ray cache equals the local engine's (same file name, same datasets bit for bit)")
    for decode in args.decode_in.split(","):
        label = f"ray, decode in {decode}"
        locals_ = [x for x in results if x["label"] == "local"]
        rays = [x for x in results if x["label"] == label]
        steady = sum(x["steady_rate"] for x in rays) / sum(x["steady_rate"] for x in locals_)
        compute = sum(x["compute_rate"] for x in rays) / sum(x["compute_rate"] for x in locals_)
        wall = sum(x["wall_s"] for x in locals_) / sum(x["wall_s"] for x in rays)
        print(f"{label}: steady rows/s {steady:.2f} x local (target >= 0.8); compute phase with actor start "
              f"{compute:.2f} x; whole call {wall:.2f} x")


if __name__ == "__main__":
    main()
