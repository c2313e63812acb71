"""Sealing a sharded cache's master, and opening it for reuse, at real map sizes: stored row digests against
reading every map.

An incremental ``extract`` writes a new master over the old shards and the new ones. Its checksums used to be
computed by reading every mapped row (and the old master was first checked whole, another full read): the cost
of adding one image grew with the whole cache. Now shards store each row's digest (16 bytes a row) and the master
is sealed from those. Shards written before they were stored take the old path (their rows are read and checked
against their seal), so the two sides run the same ``write_master`` on the same rows, side by side:

- stored: shards with row digests (what ``extract`` writes now);
- read:   the same rows in shards without them (what every master cost before).

Also timed: ``ReusableCache.open`` of the resulting master (what every rerun of ``extract`` does first) and
``check_dataset`` of /features and /pooled (the whole read it used to do there).

Reproduce:
    python benchmarks/bench_master_seal.py                         # 5,000 rows of 7x7x512 float16 (VGG16)
    python benchmarks/bench_master_seal.py --rows 26786 --shards 20  # the full Kermany layout with 5 copies
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--shape", default="7,7,512", help="feature map shape per row")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import h5py
    import numpy as np

    import featcache.shards as shards_module
    from featcache.cachewrite import FileTable
    from featcache.checksums import check_dataset, read_checked
    from featcache.master import write_master
    from featcache.partial import ReusableCache

    shape = tuple(int(x) for x in args.shape.split(","))
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="featcache-seal-"))
    n, per = args.rows, -(-args.rows // args.shards)
    keys = [(f"train/A/{i:07d}.png", f"{i:064x}", 0) for i in range(n)]
    table = FileTable(path=[k[0] for k in keys], sha256=[k[1] for k in keys], label=np.zeros(n, np.int16),
                      split=np.where(np.arange(n) % 5 == 0, 1, 0).astype(np.uint8), patient=[str(i) for i in range(n)])
    columns = {"labels": table.label, "split": table.split, "source_index": np.arange(n), "copy_index": np.zeros(n)}
    manifest = {"fingerprint": "f" * 64, "backbone": "bench", "class_names": ["A", "B"], "feature_shape": list(shape),
                "dtype": "float16", "counts": {"rows": n}}
    sides = {}
    started = time.perf_counter()
    for side, digests in (("stored", shards_module.DIGEST_DATASETS), ("read", {})):
        folder = work / side / "bench-ffffffffffff.shards"
        files = []
        saved, shards_module.DIGEST_DATASETS = shards_module.DIGEST_DATASETS, digests
        try:
            for start in range(0, n, per):
                stop = min(n, start + per)
                maps = rng.standard_normal((stop - start, *shape), dtype=np.float32).astype(np.float16)
                files.append(shards_module.write_shard(folder, "f" * 64, maps, maps.mean(axis=(1, 2), dtype=np.float32),
                                                       keys[start:stop]))
        finally:
            shards_module.DIGEST_DATASETS = saved
        sources = [(i // per, i % per) for i in range(n)]
        sides[side] = (work / side / "bench-ffffffffffff.h5", files, sources)
    data_mb = sum(f.stat().st_size for f in (work / "stored").rglob("*.h5")) / 2**20
    print(f"{n} rows of {shape} float16 in {len(sides['stored'][1])} shards ({data_mb:.0f} MiB); "
          f"shards written in {time.perf_counter() - started:.1f} s", flush=True)

    times = {side: {"seal": [], "reuse": [], "whole": []} for side in sides}
    for _ in range(args.rounds):  # alternated, so machine noise hits both sides
        for side, (final, files, sources) in sides.items():
            final.unlink(missing_ok=True)
            t = time.perf_counter()
            write_master(final, files, sources, table, columns, manifest)
            times[side]["seal"].append(time.perf_counter() - t)
            t = time.perf_counter()
            with h5py.File(final, "r") as handle:
                ReusableCache(handle)
            times[side]["reuse"].append(time.perf_counter() - t)
            t = time.perf_counter()
            with h5py.File(final, "r") as handle:
                split = read_checked(handle, "split")
                for name in ("features", "pooled"):
                    check_dataset(handle, name, split)
            times[side]["whole"].append(time.perf_counter() - t)
    for side in sides:
        best = {k: min(v) for k, v in times[side].items()}
        print(f"{side:>6}: write_master {best['seal']:.3f} s, ReusableCache {best['reuse']:.3f} s, "
              f"a whole checked read of /features + /pooled {best['whole']:.3f} s (best of {args.rounds})")
    stored, read = ({k: min(v) for k, v in times[s].items()} for s in ("stored", "read"))
    print(f"write_master: read / stored = {read['seal'] / stored['seal']:.1f}x; a rerun's reuse check used to add "
          f"{stored['whole']:.3f} s (a whole checked read), now {stored['reuse']:.3f} s")
    print(f"load average {os.getloadavg()[0]:.1f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
