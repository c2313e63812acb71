"""Extraction speed and memory, measured side by side in one run.

1. Throughput: the whole extract pipeline (decode, augment, backbone, batch writes, cache assembly)
   against the bare backbone forward pass over the same number of already-decoded images, same batch
   size, alternating the two so machine noise hits both. Target: pipeline >= 90 % of bare.
2. Memory: peak RSS of a complete extract (fresh process) on the dev set and on four times as many
   images. Target: flat (streaming, no whole-dataset arrays).

Reproduce:
    python benchmarks/bench_extract.py                       # both parts, VGG16 + ResNet152 at 224 px
    python benchmarks/bench_extract.py --part speed --images 96 --backbone vgg16
    python benchmarks/bench_extract.py --part speed --batch-size 64 --images 400   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
DEV = Path(os.environ.get("FEATCACHE_SHARED_DATA", REPO.parent / "shared" / "data")) / "chest_xray_dev"


def make_subset(target: Path, n_train: int, n_test: int, copies_of_dev: int = 0) -> Path:
    """A Kermany folder: the first images of each class, or the whole dev set repeated under new names."""
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            (target / split / cls).mkdir(parents=True, exist_ok=True)
            files = sorted((DEV / split / cls).iterdir())
            if copies_of_dev:
                for i in range(copies_of_dev):
                    for f in files:
                        shutil.copyfile(f, target / split / cls / f"dup{i}_{f.name}")
            else:
                n = (n_train if split == "train" else n_test) // 2
                for f in files[:n]:
                    shutil.copyfile(f, target / split / cls / f.name)
    return target


def bench_speed(backbone: str, images: int, batch_size: int, image_size: int, rounds: int,
                precision: str = "auto") -> dict:
    import numpy as np

    from featcache.backbones import build_extractor, get_backbone_spec, load_backbone
    from featcache.config import ExtractConfig
    from featcache.data import find_images
    from featcache.decode import load_image
    from featcache.compute import build_forward, pad
    from featcache.extract import _effective_precision, extract_features

    work = Path(tempfile.mkdtemp(prefix="fc-bench-"))
    data = make_subset(work / "data", n_train=images // 2, n_test=images // 2)
    # K=1: train rows get one augmented copy, so augmentation is inside the measured pipeline too.
    folder = find_images(data, seed=0)
    decoded = [load_image(data / r.path, image_size) for r in folder.records]
    spec = get_backbone_spec(backbone)
    precision = _effective_precision(precision)  # both sides compute alike: mixed + XLA on a GPU
    backbone_model = load_backbone(spec, image_size, "random", 0, mixed=precision == "mixed")
    extractor = build_extractor(spec, backbone_model, image_size)
    forward = build_forward(extractor)
    started = time.perf_counter()
    forward(pad(np.stack(decoded[:batch_size]), batch_size))  # the bare side is timed after its trace
    first_call = time.perf_counter() - started
    bare_rates, pipe_rates, steady_rates, wall_rates, fixed = [], [], [], [], []
    for round_ in range(rounds):
        # Alternate which side goes first, so a burst of load elsewhere on the machine hits both.
        sides = ("pipeline", "bare") if round_ % 2 == 0 else ("bare", "pipeline")
        for side in sides:
            if side == "pipeline":
                config = ExtractConfig(data_dir=data, backbones=(backbone,), weights="random", augment_copies=1,
                                       image_size=image_size, batch_size=batch_size,
                                       cache_dir=work / f"cache{round_}", precision=precision, progress=False)
                started = time.perf_counter()
                (summary,) = extract_features(config)
                wall = time.perf_counter() - started
                rows = summary.computed_rows
                wall_rates.append(rows / wall)
                pipe_rates.append(summary.images_per_second)
                steady_rates.append(summary.timing.steady_rate(rows))
                # one-time costs of a run: model build, weight hash, trace (first batch beyond its share)
                fixed.append(wall - (rows - summary.timing.first_batch_rows) / steady_rates[-1])
            else:
                rows = len(decoded) + sum(r.split == "train" for r in folder.records)  # originals + one copy each
                batch_images = [decoded[i % len(decoded)] for i in range(rows)]
                started = time.perf_counter()
                for start in range(0, rows, batch_size):
                    forward(pad(np.stack(batch_images[start:start + batch_size]), batch_size))
                bare_rates.append(rows / (time.perf_counter() - started))
    shutil.rmtree(work, ignore_errors=True)
    best = lambda xs: max(xs)  # noqa: E731  best of rounds: the least disturbed measurement of each side
    return {"backbone": backbone, "image_size": image_size, "batch_size": batch_size, "rows": rows,
            "precision": precision,
            "bare_img_s": best(bare_rates), "pipeline_img_s": best(pipe_rates), "whole_run_img_s": best(wall_rates),
            "first_call_s": first_call, "steady_img_s": best(steady_rates), "fixed_s": min(fixed),
            "pipeline_over_bare": best(pipe_rates) / best(bare_rates),
            "steady_over_bare": best(steady_rates) / best(bare_rates),
            "whole_run_over_bare": best(wall_rates) / best(bare_rates)}


def bench_memory(image_size: int) -> list[dict]:
    """Peak RSS of a fresh extract process (tiny backbone, so the run is quick) on 1x and 4x the dev set.

    Read as VmHWM from /proc: getrusage's ru_maxrss survives fork+exec on Linux, so a child would
    report this (large) parent's peak.
    """
    results = []
    for scale in (1, 4):
        work = Path(tempfile.mkdtemp(prefix="fc-mem-"))
        data = make_subset(work / "data", 0, 0, copies_of_dev=scale)
        code = (
            "from pathlib import Path; from featcache.config import ExtractConfig; "
            "from featcache.extract import extract_features; "
            f"s, = extract_features(ExtractConfig(data_dir=Path({str(data)!r}), backbones=('tiny',), weights='random', "
            f"image_size={image_size}, augment_copies=5, cache_dir=Path({str(work / 'cache')!r}), progress=False)); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            "print(s.counts['rows'], hwm)"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        results.append({"images": scale * 451, "rows": int(out[0]), "peak_rss_mib": int(out[1]) / 1024})
        shutil.rmtree(work, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("speed", "memory", "all"), default="all")
    parser.add_argument("--backbone", action="append", help="default: vgg16 and resnet152")
    parser.add_argument("--images", type=int, default=96, help="images per speed round (train + test)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", choices=("auto", "float32", "mixed"), default="auto",
                        help="as extract's --precision; auto = mixed + XLA on a GPU")
    args = parser.parse_args()
    print(f"# {' '.join(sys.argv)}  (cores: {os.cpu_count()})")
    if args.part in ("speed", "all"):
        for backbone in args.backbone or ("vgg16", "resnet152"):
            r = bench_speed(backbone, args.images, args.batch_size, args.image_size, args.rounds, args.precision)
            dev_rows = 1656  # the dev set with K=5 (451 originals + 5 copies of 241 train images), as README runs it
            projected = dev_rows / (dev_rows / r["steady_img_s"] + r["fixed_s"]) / r["bare_img_s"]
            print(f"speed {backbone} {r['image_size']}px batch {r['batch_size']}, {r['rows']} rows: "
                  f"bare {r['bare_img_s']:.2f} img/s; pipeline after its first batch {r['steady_img_s']:.2f} img/s "
                  f"({r['steady_over_bare']:.1%} of bare; target >= 90%); whole run {r['whole_run_img_s']:.2f} img/s "
                  f"({r['whole_run_over_bare']:.1%}) with {r['fixed_s']:.1f} s of one-time costs (build, weight "
                  f"hash, trace: a fresh forward's first call takes {r['first_call_s']:.1f} s); "
                  f"the same costs over the {dev_rows} rows of the dev set: {projected:.1%} (projected)")
            print(json.dumps(r))
    if args.part in ("memory", "all"):
        small, large = bench_memory(args.image_size)
        print(f"memory tiny {args.image_size}px K=5: {small['images']} images ({small['rows']} rows) "
              f"peak RSS {small['peak_rss_mib']:.0f} MiB; {large['images']} images ({large['rows']} rows) "
              f"{large['peak_rss_mib']:.0f} MiB; ratio {large['peak_rss_mib'] / small['peak_rss_mib']:.2f} "
              "(target: flat, ~1.0)")


if __name__ == "__main__":
    main()
