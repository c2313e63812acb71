"""Incremental extraction on a sharded cache: adding 1 % more images to a large cache, against a rebuild.

Synthetic 32x32 grayscale PNGs (seeded noise, one patient each) in the Kermany layout; the tiny backbone
at 32 px, no augmented copies, so rows = images. Measured in one process, side by side:

1. build:       a clean extract of N images (cache A).
2. incremental: 1 % more images added to the folder, extract into cache A again (new shard + new master).
3. rebuild:     a clean extract of the N + 1 % images into an empty folder (cache B, same split registry).
   Caches A and B must hold equal datasets. Target: incremental <= 5 % of the rebuild's wall time.
4. disk:        bytes of cache A before and after the increment, against the bytes of the new rows.
5. reads:       /pooled (train+val, as train-head) and /features (test rows, streamed, as evaluate) with
   their checksums, and both whole with plain h5py, from the incremental master (many mappings), the
   rebuilt master (one mapping per shard) and a compacted copy (one plain file), alternated.

Reproduce:
    python benchmarks/bench_incremental.py --images 100000
    python benchmarks/bench_incremental.py --images 5000 --keep /tmp/inc   # quick look, keeps the files
    python benchmarks/bench_incremental.py --keep /tmp/inc --again         # phases 2-5 again on the kept folder
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def png(pixels: bytes, side: int) -> bytes:
    """A grayscale 8-bit PNG of ``side`` x ``side`` pixels (no filter), written with zlib only."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + pixels[i * side:(i + 1) * side] for i in range(side))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 1)) + chunk(b"IEND", b"")


def make_images(root: Path, start: int, stop: int, side: int = 32) -> None:
    """Images ``start..stop-1``: 1 in 8 in test/, 30 % NORMAL, each its own patient (``person<i>``)."""
    import numpy as np

    rng = np.random.default_rng(start)
    for i in range(start, stop):
        split = "test" if i % 8 == 0 else "train"
        label = "NORMAL" if (i * 7919) % 10 < 3 else "PNEUMONIA"
        folder = root / split / label
        folder.mkdir(parents=True, exist_ok=True)
        base = (np.arange(side * side, dtype=np.int64) * (3 + i % 5) + i) % 200
        noise = rng.integers(0, 55, side * side)
        (folder / f"person{i}_img.png").write_bytes(png((base + noise).astype(np.uint8).tobytes(), side))


def disk_bytes(cache_dir: Path) -> int:
    return sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file())


def same_datasets(a: Path, b: Path) -> bool:
    """Every dataset of two HDF5 files equal, bit for bit."""
    import h5py
    import numpy as np

    def read(path):
        out = {}
        with h5py.File(path, "r") as handle:
            handle.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else 0)
        return out

    da, db = read(a), read(b)
    return da.keys() == db.keys() and all(np.array_equal(da[k], db[k]) for k in da)


def timed(label: str, fn):
    started = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - started
    print(f"{label}: {seconds:.2f} s", flush=True)
    return value, seconds


def read_like_the_stages(path: Path) -> tuple[float, float]:
    """Seconds to read /pooled of train+val (train-head) and /features of the test rows in blocks
    (evaluate), each with its checksums."""
    import numpy as np

    from featcache.cache import load_pooled, open_cache
    from featcache.checksums import CheckedRows, read_checked

    started = time.perf_counter()
    load_pooled(path, ("train", "val"))
    pooled = time.perf_counter() - started
    started = time.perf_counter()
    with open_cache(path) as handle:
        rows = CheckedRows(handle, "features", read_checked(handle, "split"), ("test",))
        for _ in range(0, len(rows.rows), 4096):
            block = rows.read(4096)
            np.asarray(block, np.float32).sum()
        rows.finish()
    return pooled, time.perf_counter() - started


def read_whole(path: Path) -> tuple[float, float]:
    """Seconds to read every row of /pooled and of /features with plain h5py slicing (no checksums)."""
    import h5py

    with h5py.File(path, "r") as handle:
        started = time.perf_counter()
        handle["pooled"][...]
        pooled = time.perf_counter() - started
        started = time.perf_counter()
        handle["features"][...]
        return pooled, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000, help="images in the first cache")
    parser.add_argument("--added", type=float, default=0.01, help="fraction of images added")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep the files")
    parser.add_argument("--skip-rebuild", action="store_true", help="no clean rebuild (parts 3 and the equality)")
    parser.add_argument("--again", action="store_true",
                        help="with --keep: reuse its data folder and cache A (brought up to date first, untimed), "
                             "add 1 %% more images and measure phases 2-5 again")
    args = parser.parse_args()
    if args.again and args.keep is None:
        parser.error("--again needs --keep")

    from featcache.compact import compact_path
    from featcache.config import ExtractConfig
    from featcache.extract import extract_features

    work = args.keep or Path(tempfile.mkdtemp(prefix="featcache-inc-"))
    work.mkdir(parents=True, exist_ok=True)
    data, cache_a, cache_b = work / "data", work / "cache-a", work / "cache-b"
    for folder in (cache_b, work / "compacted") if args.again else (data, cache_a, cache_b, work / "compacted"):
        shutil.rmtree(folder, ignore_errors=True)
    if args.again:
        args.images = sum(1 for _ in data.rglob("*.png"))
        # without the weights-hash memo the catch-up imports TensorFlow and builds the backbone, as phase 1 does in
        # a whole run: otherwise a no-op catch-up skips TensorFlow and phase 2 alone pays its start (~10 s)
        (cache_a / ".weights-hashes.json").unlink(missing_ok=True)
    n, extra = args.images, max(1, round(args.images * args.added))
    if not args.again:
        timed(f"write {n} PNGs", lambda: make_images(data, 0, n))

    def config(cache_dir: Path) -> ExtractConfig:
        return ExtractConfig(data_dir=data, backbones=("tiny",), weights="random", augment_copies=0, image_size=32,
                             batch_size=args.batch_size, seed=0, cache_dir=cache_dir, progress=False)

    (built,), build_s = timed(f"1. {'bring the kept cache up to date,' if args.again else 'build'} {n} images",
                              lambda: extract_features(config(cache_a)))
    before = disk_bytes(cache_a)
    timed(f"write {extra} more PNGs", lambda: make_images(data, n, n + extra))
    (grown,), inc_s = timed(f"2. incremental +{extra} images", lambda: extract_features(config(cache_a)))
    after = disk_bytes(cache_a)
    new_rows = grown.counts["rows"] - built.counts["rows"]
    row_bytes = (before - 0) / built.counts["rows"]
    print(f"   computed {grown.computed_rows} rows, reused {grown.reused_rows}; shard files "
          f"{len(list(cache_a.glob('*.shards/*.h5')))}")
    print(f"4. disk: {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB (+{(after - before) / 2**10:.1f} KiB) for "
          f"{new_rows} new rows; at the cache's mean {row_bytes:.1f} B/row those rows are "
          f"{new_rows * row_bytes / 2**10:.1f} KiB")
    if not args.skip_rebuild:
        cache_b.mkdir()
        shutil.copyfile(cache_a / "split-seed0.json", cache_b / "split-seed0.json")
        (rebuilt,), rebuild_s = timed(f"3. rebuild {n + extra} images", lambda: extract_features(config(cache_b)))
        print(f"   incremental / rebuild = {inc_s / rebuild_s:.4f} ({inc_s:.2f} s / {rebuild_s:.2f} s)"
              + ("" if args.again else f"; incremental / first build = {inc_s / build_s:.4f}")
              + f"; load average {os.getloadavg()[0]:.1f}")
        print(f"   datasets of the incremental and the rebuilt cache equal: "
              f"{same_datasets(grown.cache_path, rebuilt.cache_path)}")
    compacted = work / "compacted"
    shutil.copytree(cache_a, compacted)
    _, compact_s = timed("compact a copy", lambda: compact_path(compacted))
    import h5py

    sides = {"incremental (sharded)": grown.cache_path, "compacted (plain)": compacted / grown.cache_path.name}
    if not args.skip_rebuild:
        sides["rebuild (sharded)"] = rebuilt.cache_path
    for name, path in sides.items():
        with h5py.File(path, "r") as handle:
            maps = len(handle["features"].virtual_sources()) if handle["features"].is_virtual else 0
        print(f"   {name}: {maps} virtual mappings of /features")
    for label, reader in (("stages (checksums)", read_like_the_stages), ("plain h5py, whole", read_whole)):
        times = {name: [] for name in sides}
        for _ in range(3):  # alternated, so machine noise hits every side
            for name, path in sides.items():
                times[name].append(reader(path))
        for name in sides:
            best = [min(t[i] for t in times[name]) for i in range(2)]
            print(f"5. reads, {label}, best of 3, {name}: /pooled {best[0]:.3f} s, /features {best[1]:.3f} s")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
