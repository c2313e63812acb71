"""The host side of extraction on full-resolution X-rays: read, decode, resize, augment (issue 9, part 4).

The Kermany originals are about 1,000-2,500 px on a side; the dev images are downscaled, so this makes
full-resolution JPEGs from them (each dev image upscaled to a seeded size in that range, quality 92). Then,
side by side in one process, alternating rounds so machine noise hits every side:

- the code of this tree ("now") beside the code at git ``--before`` ("before": e973cc1, before gray images were
  decoded, resized and augmented in one channel), both in this process;
- images/s of what extract's decode threads do per training image (``load_image`` + 5 augmented copies,
  as ``compute.prepare_batch``), with ``--decode exact`` (today's default) and ``--decode fast`` (DCT-scaled
  JPEG decoding), on 1 thread and on every core;
- where one image's time goes on one thread: reading the bytes, decoding at full size, decoding at the
  fast scale, the resize, and the augmentation of 5 copies.

Target (issue 9): at least 2x the images/s per core of before on full-resolution JPEGs.

Reproduce:
    python benchmarks/bench_host.py                  # 48 images, 224 px, 3 rounds
    python benchmarks/bench_host.py --images 32 --rounds 3 --before e973cc1
    python benchmarks/bench_host.py --before ''     # this tree alone
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
DEV = Path(os.environ.get("FEATCACHE_SHARED_DATA", REPO.parent / "shared" / "data")) / "chest_xray_dev"
COPIES = 5
BEFORE = "e973cc1"  # main before gray images went through in one channel (issue 9, part 4)


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


def load_version(ref: str | None):
    """(decoding, augment) modules: this tree's ``decode`` and ``augment`` (``ref`` None), or ``featcache/data.py``
    (where decoding lived then) and ``augment.py`` as they are at git ``ref``, loaded under other names beside
    them (the rest of featcache is this tree's)."""
    if ref is None:
        from featcache import augment, decode

        return decode, augment
    modules = []
    for name in ("data", "augment"):
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:featcache/{name}.py"], check=True,
                                capture_output=True, text=True).stdout
        module = types.ModuleType(f"featcache_at_{ref}_{name}")
        module.__file__ = f"{ref}:featcache/{name}.py"
        sys.modules[module.__name__] = module  # dataclasses look their module up
        exec(compile(source, module.__file__, "exec"), module.__dict__)
        modules.append(module)
    return tuple(modules)


def one_image(version, path: Path, image_size: int, scaled: bool) -> None:
    """What a decode thread of extract does for one training image with 5 copies."""
    data, augment = version
    image = data.load_image(path, image_size, scaled=scaled)
    augment.augment_copies(image, list(range(1, COPIES + 1)), 0, hashlib.sha256(path.name.encode()).hexdigest())


def rate(version, paths: list[Path], image_size: int, scaled: bool, threads: int) -> float:
    started = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda p: one_image(version, p, image_size, scaled), paths))
    return len(paths) / (time.perf_counter() - started)


def breakdown(versions: dict, paths: list[Path], image_size: int, rounds: int) -> dict:
    """Per version, mean milliseconds per image of each step on this thread (versions alternated image by image).
    The decode is what the version's ``decode_and_resize`` decodes (one channel for a gray file where it has
    ``decode_pixels``); the augmentation gets the 3-channel image extract gives it."""
    import tensorflow as tf

    spec = tf.TensorSpec([], tf.string)
    compiled = {}
    for code, (data, _) in versions.items():
        decode = getattr(data, "decode_pixels", data.decode_rgb)
        compiled[code] = (
            tf.function(lambda e, decode=decode: decode(e), input_signature=[spec], autograph=False),
            tf.function(lambda e, decode=decode, data=data: decode(e, min_side=data.JPEG_SCALE_MARGIN * image_size),
                        input_signature=[spec], autograph=False),
            tf.function(lambda image, data=data: data.resize_square(image, image_size),
                        input_signature=[tf.TensorSpec([None, None, None], tf.uint8)], autograph=False),
        )
    names = ["read", "decode full size", "decode at the fast scale", "resize (from full size)",
             "resize (from the fast scale)", f"augment {COPIES} copies", "decode_and_resize exact",
             "decode_and_resize fast"]
    steps = {code: dict.fromkeys(names, 0.0) for code in versions}

    def timed(code, name, step):
        t = time.perf_counter()
        out = step()
        steps[code][name] += time.perf_counter() - t
        return out

    for _ in range(rounds):
        for path in paths:
            for code, (data, augment) in versions.items():
                full, fast, resize = compiled[code]
                encoded = tf.constant(timed(code, "read", path.read_bytes))
                image = timed(code, "decode full size", lambda: full(encoded).numpy())
                scaled = timed(code, "decode at the fast scale", lambda: fast(encoded).numpy())
                small = timed(code, "resize (from full size)", lambda: resize(tf.constant(image)).numpy())
                timed(code, "resize (from the fast scale)", lambda: resize(tf.constant(scaled)).numpy())
                rgb = np.repeat(small, 3 // small.shape[2], axis=2)
                timed(code, f"augment {COPIES} copies",
                      lambda: augment.augment_copies(rgb, list(range(1, COPIES + 1)), 0, "0" * 64))
                for name, fast_decode in (("decode_and_resize exact", False), ("decode_and_resize fast", True)):
                    timed(code, name, lambda: data._compiled_decoder(image_size, scaled=fast_decode)(encoded).numpy())
    return {code: {name: 1000 * seconds / len(paths) / rounds for name, seconds in times.items()}
            for code, times in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default=BEFORE, help="git ref of the code to compare with ('' for none)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    versions = {"now": load_version(None)}
    if args.before:
        versions = {"before": load_version(args.before), **versions}
    with tempfile.TemporaryDirectory(prefix="featcache-host-") as tmp:
        paths = make_full_resolution(Path(tmp), args.images)
        megabytes = sum(p.stat().st_size for p in paths) / 2**20
        print(f"{len(paths)} full-resolution JPEGs (1,000-2,500 px wide), {megabytes:.1f} MiB; {cores} cores; "
              f"{args.image_size} px, {COPIES} augmented copies each; before = {args.before or '-'}; "
              f"load average {os.getloadavg()[0]:.2f}")
        for version in versions.values():  # warm-up: traces of both decoders and the augmentation
            for scaled in (False, True):
                one_image(version, paths[0], args.image_size, scaled)
        sides = [(code, decode, threads) for decode in ("exact", "fast") for threads in sorted({1, cores})
                 for code in versions]
        rates = {side: [] for side in sides}
        for _ in range(args.rounds):
            for code, decode, threads in sides:
                rates[code, decode, threads].append(
                    rate(versions[code], paths, args.image_size, decode == "fast", threads))
        print(f"\n{'code':<8}{'decode':<8}{'threads':>8}{'images/s (median)':>20}{'per core':>10}")
        median = {side: float(np.median(values)) for side, values in rates.items()}
        for (code, decode, threads), value in median.items():
            print(f"{code:<8}{decode:<8}{threads:>8}{value:>20.1f}{value / threads:>10.1f}")
        for threads in sorted({1, cores}):
            for code in versions:
                print(f"{code}: fast / exact on {threads} thread(s): "
                      f"{median[code, 'fast', threads] / median[code, 'exact', threads]:.2f}x")
            if "before" in versions:
                for decode in ("exact", "fast"):
                    print(f"now {decode} / before {decode} on {threads} thread(s): "
                          f"{median['now', decode, threads] / median['before', decode, threads]:.2f}x")
                print(f"now fast / before exact on {threads} thread(s): "
                      f"{median['now', 'fast', threads] / median['before', 'exact', threads]:.2f}x (target >= 2x)")
        if cores > 1:
            for code in versions:
                for decode in ("exact", "fast"):
                    print(f"{code} {decode}: {cores} threads / 1 thread: "
                          f"{median[code, decode, cores] / median[code, decode, 1]:.2f}x")
        print("\nwhere one image's time goes (one thread, mean ms):")
        times = breakdown(versions, paths, args.image_size, args.rounds)
        print(f"  {'':<30}" + "".join(f"{code:>10}" for code in versions))
        for name in times["now"]:
            print(f"  {name:<30}" + "".join(f"{times[code][name]:>10.1f}" for code in versions))
        print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
