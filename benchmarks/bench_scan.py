"""The folder scan every ``featcache extract`` starts with: ``data.find_images`` and ``extract._hash_files``.

Writes N one-byte ``.png`` files in the Kermany layout (nothing is decoded: the scan never opens an image
except to hash it), then times, in one process: ``find_images``; hashing with no hash cache; hashing with
an empty hash cache (cold: every file read, the cache written); and again (warm: every file only stat'ed).

Reproduce:
    python benchmarks/bench_scan.py --files 100000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_tree(root: Path, n: int) -> None:
    for i in range(n):
        folder = root / ("test" if i % 8 == 0 else "train") / ("NORMAL" if (i * 7919) % 10 < 3 else "PNEUMONIA")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"person{i}_img.png").write_bytes(b"x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    args = parser.parse_args()
    from featcache import extract, hashcache
    from featcache.data import find_images

    hashcache.RACY_SECONDS = 0.0  # the files were just written; a real folder's files are older
    with tempfile.TemporaryDirectory() as work:
        root, cache = Path(work) / "data", Path(work) / "cache"
        cache.mkdir()
        started = time.perf_counter()
        make_tree(root, args.files)
        print(f"write {args.files} files: {time.perf_counter() - started:.2f} s")
        started = time.perf_counter()
        folder = find_images(root, seed=0)
        print(f"find_images: {time.perf_counter() - started:.2f} s ({len(folder.records)} records)")
        results = []
        for name, cache_dir in (("no hash cache", None), ("cold hash cache", cache), ("warm hash cache", cache)):
            started = time.perf_counter()
            files, _ = extract._hash_files(folder, cache_dir=cache_dir)
            print(f"_hash_files, {name}: {time.perf_counter() - started:.2f} s")
            results.append(files)
        print(f"same hashes: {results[0] == results[1] == results[2]}; hash cache "
              f"{os.path.getsize(cache / hashcache.HASHES_FILE) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
