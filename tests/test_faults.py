"""Fault injection and hostile input for ``featcache extract``: kills at seeded random points, a file-size
limit, read-only folders, damaged work files, failing worker threads, hostile folder entries, bad settings.

Every run uses the tiny backbone on a few real X-rays; subprocesses (needed for SIGKILL and rlimits) run
side by side so that TensorFlow's start-up is paid in parallel.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_same_datasets, copy_subset
from featcache.cache import list_caches, read_manifest
from featcache.cachewrite import ROW_DTYPES
from featcache.config import MAX_AUGMENT_COPIES, MAX_SEED, ExtractConfig
from featcache.errors import FeatcacheError, StorageError
from featcache.extract import extract_features, format_summary
from pipeline import run_cli

# One setting for every run here: 70 rows in 35 batches of 2; float32 maps at 192 px make the cache
# (about 170 KB) larger than the saved random weights (about 50 KB).
SETTINGS = dict(backbones=("tiny",), weights="random", augment_copies=2, image_size=192, batch_size=2, seed=0,
                dtype="float32", progress=False)
CLI = ["--backbone", "tiny", "--weights", "random", "--augment-copies", "2", "--image-size", "192", "--batch-size",
       "2", "--seed", "0", "--dtype", "float32", "--no-progress"]
SUBSET = {"train/NORMAL": 8, "train/PNEUMONIA": 16, "test/NORMAL": 4, "test/PNEUMONIA": 4}
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.fixture(scope="module")
def data(tmp_path_factory, dev_data) -> Path:
    return copy_subset(dev_data, tmp_path_factory.mktemp("faults") / "xrays", SUBSET)


@pytest.fixture(scope="module")
def clean(data, tmp_path_factory) -> Path:
    """The cache of an uninterrupted run, the reference every faulty run must end up equal to."""
    (summary,) = extract_features(ExtractConfig(data_dir=data, cache_dir=tmp_path_factory.mktemp("clean"), **SETTINGS))
    return summary.cache_path


def _config(data: Path, cache_dir: Path) -> ExtractConfig:
    return ExtractConfig(data_dir=data, cache_dir=cache_dir, **SETTINGS)


def _extract(data: Path, cache_dir: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "featcache", "extract", "--data", str(data), "--cache-dir", str(cache_dir), *CLI]
    return subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)



def _error_lines(stderr: str) -> list[str]:
    """What featcache itself printed (TensorFlow's start-up lines left out)."""
    return [line for line in stderr.splitlines() if line.startswith("Error:") or "Traceback" in line]


def _in_thread(fn, timeout: float = 120.0, drop_write_permission: bool = False):
    """Run ``fn`` in a thread; its result or exception. A run still going after ``timeout`` is a hang: fail."""
    outcome: dict = {}

    def target():
        try:
            if drop_write_permission:
                _drop_dac_override_in_this_thread()
            outcome["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s: a hang"
    return outcome.get("result"), outcome.get("error")


def _drop_dac_override_in_this_thread() -> None:
    """As root, permission bits are not checked; without CAP_DAC_OVERRIDE (in this thread and the threads it
    starts: capabilities are per thread) they are, so a chmod-ed folder is read-only for the code under test."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    caps = (ctypes.c_uint32 * 6)()
    if libc.capget(header, caps) != 0:
        pytest.skip("capget failed: cannot make a folder read-only for root")
    caps[0] &= ~((1 << 1) | (1 << 2))  # effective: CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.capset(header, caps) != 0:
        pytest.skip("capset failed: cannot make a folder read-only for root")


@contextlib.contextmanager
def _read_only(folder: Path):
    modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
    for path, mode in modes.items():
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        yield
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


# --- kills and limits ---------------------------------------------------------------------------


# Below the cache (70 rows of 6x6x16 float32 maps and 16 pooled values: about 166 KB), above the weights.
FILE_SIZE_LIMIT = int(0.7 * 70 * (6 * 6 * 16 + 16) * 4)


@pytest.fixture(scope="module")
def faulty_runs(data, tmp_path_factory) -> dict:
    """Four CLI runs side by side: three killed by SIGKILL after a number of finished batches (0: as soon
    as the work folder exists; two seeded random numbers), one under a file-size limit. Returns ``{"killed": [(n, folder, returncode)], "limited": (folder, returncode, stderr)}``."""
    root = tmp_path_factory.mktemp("faulty")
    # 0: while the weights are saved or the first batch is computed; the others leave 15+ of the 35 batches
    # to go, so the poll below catches the run in time even on a busy machine.
    kill_after = [0, *sorted(random.Random(12).sample(range(1, 20), 2))]
    procs = {n: _extract(data, root / f"killed-{n}") for n in kill_after}
    limited = _extract(data, root / "limited")
    resource.prlimit(limited.pid, resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, resource.RLIM_INFINITY))  # before any write
    deadline, pending = time.monotonic() + 240, dict(procs)
    while pending and time.monotonic() < deadline:
        for n, proc in list(pending.items()):
            partial = list((root / f"killed-{n}").glob("*.partial"))
            if proc.poll() is not None or (partial and len(list(partial[0].glob("*.npz"))) >= n):
                proc.send_signal(signal.SIGKILL)
                del pending[n]
        time.sleep(0.005)
    killed = []
    for n, proc in procs.items():
        proc.kill()  # a no-op unless the deadline passed
        proc.communicate()
        killed.append((n, root / f"killed-{n}", proc.returncode))
    _, stderr = limited.communicate(timeout=240)
    return {"killed": killed, "limited": (root / "limited", limited.returncode, stderr)}


def test_sigkill_at_seeded_random_points_then_resume_equals_a_clean_run(faulty_runs, data, clean):
    for n, folder, returncode in faulty_runs["killed"]:
        assert returncode == -signal.SIGKILL, f"the run to kill after {n} batches ended with {returncode}"
        assert list_caches(folder) == [], "a killed run must not leave a cache that looks complete"
        (resumed,) = extract_features(_config(data, folder))
        assert_same_datasets(resumed.cache_path, clean)
        assert not list(folder.glob("*.partial")) and not list(folder.glob("*.incomplete"))


def test_file_size_limit_is_one_line_then_the_rerun_completes(faulty_runs, data, clean):
    """RLIMIT_FSIZE below the size of the shard that holds the maps (above every other file): exit 1 with one
    line naming the shard file being written, no crash (h5py used to segfault), and a rerun without the limit
    gives the clean cache."""
    (shard,) = clean.parent.glob(f"{clean.stem}.shards/*.h5")
    assert clean.with_name(f"{clean.stem}.weights.h5").stat().st_size < FILE_SIZE_LIMIT < shard.stat().st_size
    folder, returncode, stderr = faulty_runs["limited"]
    assert returncode == 1, stderr[-3000:]
    (line,) = _error_lines(stderr)
    assert ".h5.incomplete" in line and "file-size limit" in line and line.endswith("Received: EFBIG")
    assert list_caches(folder) == [] and not list(folder.glob("*.incomplete"))
    assert len(list(folder.glob("*.partial/*.npz"))) == 35, "every finished batch is kept"
    (resumed,) = extract_features(_config(data, folder))
    assert resumed.computed_rows == 0
    assert_same_datasets(resumed.cache_path, clean)


def test_no_space_for_the_weights_file_is_one_line(data, tmp_path, monkeypatch):
    """The random weights are written by HDF5 (through Keras), which can crash the process when a write
    fails: the space is reserved with plain I/O first, so a full disk is one line and nothing else."""
    real = os.posix_fallocate

    def disk_full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", disk_full)
    with pytest.raises(StorageError, match=r"Cannot write .*backbone\.weights\.h5: no space left.*Received: ENOSPC"):
        extract_features(_config(data, tmp_path / "cache"))
    monkeypatch.setattr(os, "posix_fallocate", real)
    assert list_caches(tmp_path / "cache") == []


def test_a_failed_batch_write_is_one_line_and_keeps_earlier_batches(data, clean, tmp_path, monkeypatch):
    real, calls = np.savez, []

    def savez(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")  # as the file's write would
        return real(*args, **kwargs)

    monkeypatch.setattr(np, "savez", savez)
    with pytest.raises(StorageError, match=r"Cannot write .*\.partial/\.\w+\.tmp\.npz: no space left"):
        extract_features(_config(data, tmp_path / "cache"))
    monkeypatch.undo()
    kept = len(list((tmp_path / "cache").glob("*.partial/*.npz")))
    assert kept >= 4 and not list((tmp_path / "cache").glob("*.partial/.*"))  # no temporary file left
    (resumed,) = extract_features(_config(data, tmp_path / "cache"))
    assert resumed.computed_rows == 70 - 2 * kept
    assert_same_datasets(resumed.cache_path, clean)


# --- folders that cannot be written ----------------------------------------------------------------


def test_rerun_on_a_read_only_complete_cache_succeeds_without_writing(data, tmp_path):
    folder = tmp_path / "cache"
    extract_features(_config(data, folder))
    before = _snapshot(folder)
    with _read_only(folder):
        summaries, error = _in_thread(lambda: extract_features(_config(data, folder)), drop_write_permission=True)
    assert error is None, repr(error)
    assert summaries[0].computed_rows == 0 and _snapshot(folder) == before


def test_read_only_cache_folder_that_needs_writing_is_one_line(data, tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    with _read_only(folder):
        _, error = _in_thread(lambda: extract_features(_config(data, folder)), drop_write_permission=True)
    assert isinstance(error, StorageError), repr(error)
    assert str(folder) in str(error) and "permission denied" in str(error) and "\n" not in str(error)
    assert list(folder.iterdir()) == []


def test_cache_dir_that_is_a_file_is_one_line(data, tmp_path):
    target = tmp_path / "not-a-folder"
    target.write_text("mine")
    result = run_cli("extract", "--data", data, "--cache-dir", target, *CLI)
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "is a file, not a folder" in result.output
    assert target.read_text() == "mine"


# --- damaged work files ---------------------------------------------------------------------------


def test_damaged_batch_files_are_recomputed(data, clean, tmp_path, monkeypatch, caplog):
    """A bad CRC, a truncated file and garbage in ``.partial/`` no longer block every resume."""
    import featcache.partial

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for a kill just before packing into a shard: every batch is on disk

    monkeypatch.setattr(featcache.partial.ShardPacker, "pack", killed)
    with pytest.raises(KeyboardInterrupt):
        extract_features(_config(data, tmp_path / "cache"))
    monkeypatch.undo()
    batches = sorted((tmp_path / "cache").glob("*.partial/*.npz"))
    assert len(batches) == 35
    flipped = bytearray(batches[3].read_bytes())
    flipped[len(flipped) // 3] ^= 0xFF  # inside the features array: only the CRC can tell
    batches[3].write_bytes(bytes(flipped))
    batches[10].write_bytes(batches[10].read_bytes()[:-100])
    batches[20].write_bytes(b"not a zip file at all" * 10)
    (resumed,) = extract_features(_config(data, tmp_path / "cache"))
    assert resumed.computed_rows == 6
    assert sum("unreadable batch" in r.message for r in caplog.records) == 3
    # Rows recomputed in other batches than a clean run's may differ in the last float32 bit.
    assert_same_datasets(resumed.cache_path, clean, float_tolerance=1e-5)


# --- worker threads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["decode", "augment", "writer"])
def test_a_failing_worker_thread_ends_the_run_instead_of_hanging(data, tmp_path, monkeypatch, where):
    import featcache.compute
    from featcache.partial import BatchStore

    def broken(*args, **kwargs):
        raise RuntimeError(f"injected {where} fault")

    target = {"decode": (featcache.compute, "load_image"), "augment": (featcache.compute, "augment_copies"),
              "writer": (BatchStore, "write")}[where]
    monkeypatch.setattr(*target, broken)
    _, error = _in_thread(lambda: extract_features(_config(data, tmp_path / "cache")))
    assert isinstance(error, RuntimeError) and f"injected {where} fault" in str(error)
    assert not [t for t in threading.enumerate() if t.name == "featcache-decode"], "the decode thread is left"


def test_out_of_memory_in_a_worker_is_one_line(data, tmp_path, monkeypatch):
    """As ``--image-size 100000`` did: ResourceExhaustedError in the decode thread used to hang extract."""
    import tensorflow as tf

    import featcache.compute

    def exhausted(*args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[100000,100000,3]")

    monkeypatch.setattr(featcache.compute, "load_image", exhausted)
    _, error = _in_thread(lambda: extract_features(_config(data, tmp_path / "cache")))
    assert isinstance(error, FeatcacheError), repr(error)
    assert str(error).startswith("Out of memory at --image-size 192") and "Received:" in str(error)


# --- hostile files and names --------------------------------------------------------------------------


def test_hostile_folder_entries_are_skipped_and_reported(data, tmp_path):
    """Dangling and looping links, a FIFO (never opened: that would block), a link to a folder and a
    name that is not UTF-8 are each listed with a reason; a link to an image file is read as that file."""
    root = tmp_path / "xrays"
    shutil.copytree(data, root)
    normal = root / "train" / "NORMAL"
    first = sorted(normal.iterdir())[0]
    (normal / "gone.jpeg").symlink_to(normal / "missing.jpeg")
    (normal / "loop.jpeg").symlink_to(normal / "loop.jpeg")
    os.mkfifo(normal / "pipe.jpeg")
    (normal / "folder-link").symlink_to(root / "test")
    (normal / "alias.jpeg").symlink_to(first)
    latin1 = os.fsencode(normal) + b"/caf\xe9.jpeg"
    with open(latin1, "wb") as handle:
        handle.write(first.read_bytes())

    result, error = _in_thread(lambda: extract_features(_config(root, tmp_path / "cache")))
    assert error is None, repr(error)
    (summary,) = result
    skipped = {s["path"]: s["error"] for s in read_manifest(summary.cache_path)["skipped"]}
    assert skipped == {
        "train/NORMAL/gone.jpeg": "dangling symbolic link (No such file or directory)",
        "train/NORMAL/loop.jpeg": "symbolic link loop",
        "train/NORMAL/pipe.jpeg": "not a regular file (FIFO)",
        "train/NORMAL/folder-link": "symbolic link to a folder (not followed)",
        "train/NORMAL/caf\\xe9.jpeg": "file name is not valid UTF-8; rename it",
    }
    assert summary.counts["train"] + summary.counts["val"] == 25  # the 24 images and the link to one of them
    text = format_summary(summary)
    assert "caf\\xe9.jpeg" in text and text.encode("utf-8")  # printable
    json.dumps(read_manifest(summary.cache_path))
    (again,) = extract_features(_config(root, tmp_path / "cache"))
    assert again.computed_rows == 0 and len(again.skipped) == 5


# --- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command, option, value", [
    ("extract", "--seed", -1), ("extract", "--seed", 2**32), ("extract", "--augment-copies", MAX_AUGMENT_COPIES + 1),
    ("train-head", "--seed", -1), ("train-head", "--seed", MAX_SEED + 1), ("evaluate", "--seed", 2**32),
])
def test_out_of_range_settings_are_one_line_errors(tmp_path, command, option, value):
    extra = ["--data", tmp_path, "--backbone", "tiny"] if command == "extract" else []
    result = run_cli(command, *extra, "--cache-dir", tmp_path / "cache", option, value)
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and f"Received: {option[2:].replace('-', '_')}={value}" in result.output


def test_the_limits_are_what_the_cache_can_hold(tmp_path):
    assert MAX_AUGMENT_COPIES == np.iinfo(ROW_DTYPES["copy_index"]).max
    config = ExtractConfig(data_dir=tmp_path, augment_copies=MAX_AUGMENT_COPIES, seed=MAX_SEED)
    assert config.seed + 2**31 <= 2**32  # Keras/NumPy seeds, with seed + trial number in train-head


def test_the_folder_walk_keeps_hidden_folders_and_ignores_hidden_files(data, tmp_path):
    """The walk that reports hostile entries finds the same images as before: files in hidden folders count,
    hidden files do not (as with ``rglob``)."""
    from featcache.data import find_images

    root = tmp_path / "xrays"
    shutil.copytree(data, root)
    first = sorted((root / "train" / "NORMAL").iterdir())[0]
    (root / "train" / "NORMAL" / ".thumbs").mkdir()
    shutil.copyfile(first, root / "train" / "NORMAL" / ".thumbs" / "kept.jpeg")
    shutil.copyfile(first, root / "train" / "NORMAL" / ".ignored.jpeg")
    paths = {r.path for r in find_images(root, seed=0).records}
    assert "train/NORMAL/.thumbs/kept.jpeg" in paths and "train/NORMAL/.ignored.jpeg" not in paths
    assert len(paths) == 33


def test_no_space_for_the_split_file_names_it(data, tmp_path, monkeypatch):
    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")  # a failed write names no file

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(StorageError, match=r"Cannot write .*split-seed0\.json\.incomplete: no space left"):
        extract_features(_config(data, tmp_path / "cache"))
