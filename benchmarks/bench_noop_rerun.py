"""``featcache extract`` re-run with nothing to do, on N files (issue 10, part 3): wall time and peak RSS.

The data: N copies of the dev X-rays (``../shared/data/chest_xray_dev``, small JPEGs, ~31 KB median),
one patient each, 1 in 8 under ``test/``, in the Kermany layout. The cache: built once, in this process,
by the real ``extract_features`` (tiny backbone, 32 px, random weights, no augmented copies, so rows =
files) with one shortcut: the images are not decoded (``compute.prepare_batch`` hands the backbone blank
images), so the maps are synthetic but the files, hashes, split, shards, master and manifest are exactly
what extract writes. Then, each a fresh ``python -m featcache extract`` process (the real CLI path), with
its wall time and peak RSS (``wait4``):

a. cold no-op rerun: the hash cache (``<cache-dir>/.hashes.bin``) deleted, so every file is read and
   hashed; compared with ``sha256sum`` over the same files (one process, and ``xargs -P 2``) and with a
   bare ``python -c 'import featcache.extract'``.
b. warm no-op rerun: the hash cache valid, so every file is only stat'ed.
c. warm no-op rerun without the remembered weights hash (``<cache-dir>/.weights-hashes.json`` deleted): the
   full path, which imports TensorFlow and builds the backbone to hash its weights (what every rerun did
   before the memo; it writes the memo again).
Each run says whether it imported TensorFlow (a and b must not).

The files sit in the page cache (just written, then read once by an untimed ``sha256sum``), for every
side alike: MB/s are of hashing from memory, not of a disk.

With ``--breakdown``, the steps of a rerun timed one by one in this process instead: importing the CLI,
``find_images``, hashing with the warm hash cache and with none, ``sha256sum`` beside it, a whole
``extract_features`` (the path without TensorFlow, then, after ``import tensorflow``, the full path).

Reproduce:
    python benchmarks/bench_noop_rerun.py --files 100000 --keep /tmp/noop100k   # about 25 min the first time
    python benchmarks/bench_noop_rerun.py --files 100000 --keep /tmp/noop100k --breakdown
    python benchmarks/bench_noop_rerun.py --files 5000                           # a quick look
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEV = REPO.parent / "shared" / "data" / "chest_xray_dev"
if not DEV.is_dir():
    DEV = Path("/work/shared/data/chest_xray_dev")


def make_files(root: Path, n: int) -> int:
    """N copies of the dev images (cycled); returns their total bytes. Kept when a previous call wrote them."""
    marker = root / f".complete-{n}"
    sources = sorted(p for p in DEV.rglob("*.jpeg"))
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        contents = [p.read_bytes() for p in sources]
        for i in range(n):
            folder = root / ("test" if i % 8 == 0 else "train") / ("NORMAL" if (i * 7919) % 10 < 3 else "PNEUMONIA")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"person{i}_img.jpeg").write_bytes(contents[i % len(contents)])
        marker.touch()
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root)
               for f in fs if not f.startswith("."))


def build_cache(data: Path, cache: Path, batch_size: int) -> None:
    """The cache of ``data`` by extract_features, with blank images instead of decoded ones (see above)."""
    import numpy as np

    from featcache import compute, extract
    from featcache.config import ExtractConfig

    def blank_batch(root, rows, config, pool):
        return [np.zeros((config.image_size, config.image_size, 3), np.uint8)] * len(rows), list(rows), []

    compute.prepare_batch = blank_batch
    config = ExtractConfig(data_dir=data, backbones=("tiny",), weights="random", augment_copies=0, image_size=32,
                           batch_size=batch_size, seed=0, cache_dir=cache, progress=False)
    (summary,) = extract.extract_features(config)
    print(f"   built {summary.cache_path.name}: {summary.counts['rows']} rows in {summary.seconds:.1f} s", flush=True)


def run(command: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, output) of one child process, measured by GNU time (a child forked
    from this process would inherit this process's RSS high-water mark)."""
    with tempfile.NamedTemporaryFile("r") as report:
        started = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-o", report.name, "-f", "%M", *command], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{command[:3]} failed ({done.returncode}):\n{done.stdout[-3000:]}")
        return seconds, int(report.read().split()[-1]) / 1024, done.stdout


# The CLI, saying at exit whether TensorFlow was imported.
CHILD = ("import atexit, sys; atexit.register(lambda: print('tensorflow imported:', 'tensorflow' in sys.modules)); "
         "from featcache.cli import app; sys.argv = ['featcache'] + sys.argv[1:]; app()")


def noop(cli: list[str], env: dict, files: int, tensorflow: bool = False) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one CLI rerun, checked to compute nothing and to import TensorFlow or not."""
    seconds, rss, out = run(cli, env)
    if "computed 0 rows" not in out or f"reused {files}" not in out:
        raise SystemExit(f"not a no-op rerun:\n{out}")
    if f"tensorflow imported: {tensorflow}" not in out:
        raise SystemExit(f"expected tensorflow imported: {tensorflow}:\n{out}")
    return seconds, rss


def sha256sum(data: Path, parallel: int) -> float:
    started = time.perf_counter()
    subprocess.run(f"find {data} -type f -name '*.jpeg' -print0 | xargs -0 -P {parallel} -n 2000 sha256sum "
                   f"> /dev/null", shell=True, check=True)
    return time.perf_counter() - started


def breakdown(data: Path, cache: Path, mb: float, batch_size: int) -> None:
    """The steps of a warm rerun, one by one, in this process."""
    def timed(label, fn):
        started = time.perf_counter()
        value = fn()
        print(f"{label}: {time.perf_counter() - started:.2f} s", flush=True)
        return value

    timed("import featcache.cli, featcache.extract", lambda: __import__("featcache.cli") and
          __import__("featcache.extract"))
    from featcache import extract
    from featcache.config import ExtractConfig
    from featcache.data import find_images
    from featcache.weightsmemo import MEMO_FILE

    folder = timed("find_images", lambda: find_images(data, 0))
    timed("_hash_files, warm hash cache (stat only)", lambda: extract._hash_files(folder, False, cache))
    started = time.perf_counter()
    extract._hash_files(folder, False, None)
    seconds = time.perf_counter() - started
    print(f"_hash_files, no hash cache (every file read): {seconds:.2f} s, {mb / seconds:.0f} MB/s", flush=True)
    seconds = sha256sum(data, 2)
    print(f"sha256sum, xargs -P 2: {seconds:.2f} s, {mb / seconds:.0f} MB/s", flush=True)
    config = ExtractConfig(data_dir=data, backbones=("tiny",), weights="random", augment_copies=0, image_size=32,
                           batch_size=batch_size, seed=0, cache_dir=cache, progress=False)
    (summary,) = timed("extract_features, warm hash cache, remembered weights hash",
                       lambda: extract.extract_features(config))
    print(f"   computed {summary.computed_rows}, reused {summary.reused_rows}; tensorflow imported: "
          f"{'tensorflow' in sys.modules}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} "
          f"MiB", flush=True)
    timed("import tensorflow", lambda: __import__("tensorflow"))
    (cache / MEMO_FILE).unlink(missing_ok=True)
    (summary,) = timed("extract_features, warm hash cache, full path (backbone built and hashed)",
                       lambda: extract.extract_features(config))
    print(f"   computed {summary.computed_rows}, reused {summary.reused_rows}; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; load average {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each side, alternated")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep the files (reused next time)")
    parser.add_argument("--breakdown", action="store_true", help="time the steps of a rerun in this process")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="featcache-noop-"))
    work.mkdir(parents=True, exist_ok=True)
    data, cache = work / "data", work / "cache"
    started = time.perf_counter()
    nbytes = make_files(data, args.files)
    mb = nbytes / 1e6
    print(f"data: {args.files} files, {mb:.1f} MB ({time.perf_counter() - started:.1f} s to write or find)", flush=True)
    if not list(cache.glob("tiny-*.h5")):
        shutil.rmtree(cache, ignore_errors=True)
        started = time.perf_counter()
        build_cache(data, cache, args.batch_size)
        print(f"build: {time.perf_counter() - started:.1f} s", flush=True)
    if args.breakdown:
        breakdown(data, cache, mb, args.batch_size)
        return
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-c", CHILD, "extract", "--data", str(data), "--backbone", "tiny", "--weights",
           "random", "--augment-copies", "0", "--image-size", "32", "--batch-size", str(args.batch_size),
           "--seed", "0", "--cache-dir", str(cache), "--no-progress"]
    from featcache.hashcache import HASHES_FILE

    hashes, memo = cache / HASHES_FILE, cache / ".weights-hashes.json"
    sha256sum(data, 2)  # untimed: every side reads from the page cache
    run(cli, env)  # untimed: a first rerun writes the hash cache and the weights-hash memo if missing
    results: dict[str, list] = {}
    for _ in range(args.repeat):
        results.setdefault("sha256sum, 1 process", []).append((sha256sum(data, 1), 0.0))
        results.setdefault("sha256sum, xargs -P 2", []).append((sha256sum(data, 2), 0.0))
        results.setdefault("python -c 'import featcache.extract'", []).append(
            run([sys.executable, "-c", "import featcache.extract"], env)[:2])
        hashes.unlink(missing_ok=True)
        results.setdefault("a. extract, cold hash cache (every file read)", []).append(noop(cli, env, args.files))
        results.setdefault("b. extract, warm hash cache (stat only)", []).append(noop(cli, env, args.files))
        memo.unlink(missing_ok=True)
        results.setdefault("c. extract, warm hash cache, no weights memo (full path)", []).append(
            noop(cli, env, args.files, tensorflow=True))
    print(f"\n{args.files} files, {mb:.1f} MB, best of {args.repeat} (all runs: seconds / peak RSS MiB)")
    for name, runs in results.items():
        best = min(s for s, _ in runs)
        rate = f", {mb / best:.0f} MB/s" if name.startswith(("sha", "a.")) else ""
        print(f"{name}: {best:.2f} s{rate}, peak RSS {max(r for _, r in runs):.0f} MiB   "
              f"[{', '.join(f'{s:.2f}/{r:.0f}' for s, r in runs)}]")
    print(f"load average: {os.getloadavg()}; this process's peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
