"""The host side of extraction on full-resolution X-rays: read, decode, resize, augment (issue 9, part 4).

The Kermany originals are about 1,000-2,500 px on a side; the dev images are downscaled, so this makes
full-resolution JPEGs from them (each dev image upscaled to a seeded size in that range, quality 92). Then,
side by side in one process, alternating rounds so machine noise hits every side:

- images/s of what extract's decode threads do per training image (``load_image`` + 5 augmented copies,
  as ``extract._prepare_batch``), with ``--decode exact`` (today's default) and ``--decode fast`` (DCT-scaled
  JPEG decoding), on 1 thread and on every core;
- where one image's time goes on one thread: reading the bytes, decoding at full size, decoding at the
  fast scale, the resize, and the augmentation of 5 copies.

Target (issue 9): at least 2x today's images/s per core on full-resolution JPEGs.

Reproduce:
    python benchmarks/bench_host.py                  # 48 images, 224 px, 3 rounds
    python benchmarks/bench_host.py --images 96 --rounds 5
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
DEV = Path(os.environ.get("FEATCACHE_SHARED_DATA", REPO.parent / "shared" / "data")) / "chest_xray_dev"
COPIES = 5


def make_full_resolution(folder: Path, n: int, seed: int = 0) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = sorted((DEV / "train").glob("*/*.jpeg"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        width = int(rng.integers(1000, 2500))
        height = int(width * rng.uniform(0.75, 1.0))
        image = Image.open(sources[i % len(sources)]).convert("L").resize((width, height), Image.BICUBIC)
        path = folder / f"full{i:04d}.jpeg"
        image.save(path, "JPEG", quality=92)
        paths.append(path)
    return paths


def one_image(path: Path, image_size: int, scaled: bool) -> None:
    """What a decode thread of extract does for one training image with 5 copies."""
    from featcache.augment import augment_copies
    from featcache.data import load_image

    image = load_image(path, image_size, scaled=scaled)
    augment_copies(image, list(range(1, COPIES + 1)), 0, hashlib.sha256(path.name.encode()).hexdigest())


def rate(paths: list[Path], image_size: int, scaled: bool, threads: int) -> float:
    started = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda p: one_image(p, image_size, scaled), paths))
    return len(paths) / (time.perf_counter() - started)


def breakdown(paths: list[Path], image_size: int) -> dict:
    """Mean milliseconds per image of each step, on this thread."""
    import tensorflow as tf

    from featcache.augment import augment_copies
    from featcache.data import _compiled_decoder, _compiled_resize, decode_rgb

    full = tf.function(lambda e: decode_rgb(e), input_signature=[tf.TensorSpec([], tf.string)])
    fast = tf.function(lambda e: decode_rgb(e, min_side=2 * image_size), input_signature=[tf.TensorSpec([], tf.string)])
    resize = _compiled_resize(image_size)
    steps = {"read": 0.0, "decode full size": 0.0, "decode at the fast scale": 0.0, "resize (from full size)": 0.0,
             f"augment {COPIES} copies": 0.0, "decode_and_resize exact": 0.0, "decode_and_resize fast": 0.0}
    for path in paths:
        t = time.perf_counter()
        data = path.read_bytes()
        steps["read"] += time.perf_counter() - t
        encoded = tf.constant(data)
        t = time.perf_counter()
        image = full(encoded).numpy()
        steps["decode full size"] += time.perf_counter() - t
        t = time.perf_counter()
        fast(encoded).numpy()
        steps["decode at the fast scale"] += time.perf_counter() - t
        t = time.perf_counter()
        small = resize(tf.constant(image)).numpy()
        steps["resize (from full size)"] += time.perf_counter() - t
        t = time.perf_counter()
        augment_copies(small, list(range(1, COPIES + 1)), 0, "0" * 64)
        steps[f"augment {COPIES} copies"] += time.perf_counter() - t
        for name, scaled in (("decode_and_resize exact", False), ("decode_and_resize fast", True)):
            t = time.perf_counter()
            _compiled_decoder(image_size, scaled=scaled)(encoded).numpy()
            steps[name] += time.perf_counter() - t
    return {name: 1000 * seconds / len(paths) for name, seconds in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="featcache-host-") as tmp:
        paths = make_full_resolution(Path(tmp), args.images)
        megabytes = sum(p.stat().st_size for p in paths) / 2**20
        print(f"{len(paths)} full-resolution JPEGs (1,000-2,500 px wide), {megabytes:.1f} MiB; {cores} cores; "
              f"{args.image_size} px, {COPIES} augmented copies each")
        for scaled in (False, True):  # warm-up: traces of both decoders and the augmentation
            one_image(paths[0], args.image_size, scaled)
        sides = [(decode, threads) for decode in ("exact", "fast") for threads in sorted({1, cores})]
        rates = {side: [] for side in sides}
        for _ in range(args.rounds):
            for decode, threads in sides:
                rates[decode, threads].append(rate(paths, args.image_size, decode == "fast", threads))
        print(f"\n{'decode':<8}{'threads':>8}{'images/s (median)':>20}{'per core':>10}")
        median = {side: float(np.median(values)) for side, values in rates.items()}
        for (decode, threads), value in median.items():
            print(f"{decode:<8}{threads:>8}{value:>20.1f}{value / threads:>10.1f}")
        for threads in sorted({1, cores}):
            print(f"fast / exact on {threads} thread(s): {median['fast', threads] / median['exact', threads]:.2f}x "
                  f"(target >= 2x per core)")
        if cores > 1:
            for decode in ("exact", "fast"):
                print(f"{decode}: {cores} threads / 1 thread: {median[decode, cores] / median[decode, 1]:.2f}x")
        print("\nwhere one image's time goes (one thread, mean ms):")
        for name, ms in breakdown(paths, args.image_size).items():
            print(f"  {name:<28}{ms:8.1f}")


if __name__ == "__main__":
    main()
