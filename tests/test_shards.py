"""The sharded cache: a master of virtual datasets over shard files, incremental builds, compaction, kills."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import assert_same_datasets, copy_subset, read_datasets
from pipeline import run_cli

from featcache.cache import list_caches, load_pooled, open_cache, read_manifest
from featcache.compact import compact_path
from featcache.errors import DamagedFileError
from featcache.extract import extract_features
from featcache.verify import verify_cache


def _shards(cache_path):
    return sorted(cache_path.parent.glob(f"{cache_path.stem}.shards/*.h5"))


def test_the_master_is_virtual_reads_with_plain_h5py_and_moves_with_its_folder(small_xrays, extract_config, tmp_path):
    (summary,) = extract_features(extract_config(small_xrays, shard_rows=16))
    shards = _shards(summary.cache_path)
    assert len(shards) == 5  # 70 rows: 4 shards of 16 (two batches of 8 each), then the last 6
    with h5py.File(summary.cache_path, "r") as handle:  # plain h5py, no featcache
        assert handle["features"].is_virtual and handle["pooled"].is_virtual
        assert not handle["labels"].is_virtual
        sources = {s.file_name for s in handle["features"].virtual_sources()}
        assert sources == {f"{summary.cache_path.stem}.shards/{p.name}" for p in shards}  # relative paths
        features = handle["features"][...]
    stored = np.concatenate([h5py.File(p, "r")["features"][...] for p in shards])
    assert np.isfinite(features).all() and sorted(map(bytes, features)) == sorted(map(bytes, stored))
    # a clean build with one shard per cache holds the same datasets
    (single,) = extract_features(extract_config(small_xrays, cache_dir=tmp_path / "one"))
    assert len(_shards(single.cache_path)) == 1
    assert_same_datasets(summary.cache_path, single.cache_path)
    moved = shutil.move(tmp_path / "cache", tmp_path / "moved")
    assert_same_datasets(moved / summary.cache_path.name, single.cache_path)
    assert verify_cache(moved / summary.cache_path.name).ok


def test_h5ls_shows_virtual_datasets(small_xrays, extract_config):
    h5ls = shutil.which("h5ls")
    if h5ls is None:
        if os.environ.get("CI"):
            pytest.fail("h5ls is missing; CI must install hdf5-tools")
        pytest.skip("h5ls not installed (apt-get install hdf5-tools); is_virtual is checked in the test above")
    (summary,) = extract_features(extract_config(small_xrays, shard_rows=16))
    out = subprocess.run([h5ls, "-v", f"{summary.cache_path}/features"], capture_output=True, text=True,
                         cwd="/").stdout
    assert "Maps:" in out and out.count(".shards/") == 5, out


@pytest.mark.parametrize("damage, message", [
    (lambda shards: shards[1].unlink(), "is missing"),
    (lambda shards: shards[1].write_bytes(b"not hdf5"), "cannot be read"),
    (lambda shards: shutil.copyfile(shards[2], shards[1]), "was replaced"),
])
def test_a_missing_or_replaced_shard_is_one_line_naming_it(small_xrays, extract_config, damage, message):
    (summary,) = extract_features(extract_config(small_xrays, shard_rows=16))
    shards = _shards(summary.cache_path)
    damage(shards)
    with pytest.raises(DamagedFileError, match=f"shard file {shards[1]} {message}") as caught:
        load_pooled(summary.cache_path)
    assert "\n" not in str(caught.value) and str(caught.value).endswith(f"shard='{summary.cache_path.stem}.shards/"
                                                                         f"{shards[1].name}'")
    result = run_cli("train-head", "--cache-dir", summary.cache_path.parent, "--trials", "1", "--no-progress")
    (line,) = [x for x in result.output.splitlines() if x.strip()]
    assert result.exit_code == 1 and shards[1].name in line and message in line
    checks = verify_cache(summary.cache_path).checks
    assert not checks[0].ok and shards[1].name in checks[0].detail


def test_a_rotten_shard_fails_verify_and_every_reader_and_is_never_sealed_into_a_new_master(
        small_xrays, extract_config, dev_data):
    """A rerun does not read the maps of the shards its master maps (that would cost a read of the whole cache):
    the new master's checksums are the row digests stored with the shards, so a rotten row is refused by every
    reader of the old and of the new master alike, and deleting the master (as the message says) recomputes it."""
    (summary,) = extract_features(extract_config(small_xrays, shard_rows=16))
    original = read_datasets(summary.cache_path)
    shard = _shards(summary.cache_path)[0]
    with h5py.File(shard, "r+") as handle:  # valid HDF5, fletcher32 recomputed: only the SHA-256s tell
        handle["pooled"][0] += 1
        rows = handle["pooled"].shape[0]
    checks = {c.name: c for c in verify_cache(summary.cache_path).checks}
    assert not checks["shards"].ok and "/pooled does not match" in checks["shards"].detail
    assert not checks["sha256 /pooled"].ok
    extra = sorted((dev_data / "train" / "NORMAL").iterdir())[40]
    shutil.copyfile(extra, small_xrays / "train" / "NORMAL" / extra.name)
    (grown,) = extract_features(extract_config(small_xrays, shard_rows=16))  # a new master over the rotten shard
    assert grown.computed_rows > 0 and grown.reused_rows == summary.counts["rows"]
    with pytest.raises(DamagedFileError, match=r"/pooled \(\w+ rows\) does not match the SHA-256"):
        load_pooled(grown.cache_path, ("train", "val", "test"))
    assert not {c.name: c for c in verify_cache(grown.cache_path).checks}["sha256 /pooled"].ok
    # as the message says: delete the master; the rerun checks every shard, drops the rotten one, recomputes it
    grown.cache_path.unlink()
    (again,) = extract_features(extract_config(small_xrays, shard_rows=16))
    assert again.computed_rows == rows and verify_cache(again.cache_path).ok  # the same rows: the same shard name
    (small_xrays / "train" / "NORMAL" / extra.name).unlink()
    (back,) = extract_features(extract_config(small_xrays, shard_rows=16))
    rebuilt = read_datasets(back.cache_path)
    assert original.keys() == rebuilt.keys()
    for name in original:
        if original[name].dtype.kind == "f":
            np.testing.assert_allclose(original[name], rebuilt[name], atol=1e-5, err_msg=name)
        else:
            assert np.array_equal(original[name], rebuilt[name]), name


def test_shards_written_before_row_digests_are_checked_when_a_master_is_sealed_over_them(
        small_xrays, extract_config, dev_data, monkeypatch):
    """Older shards have no stored row digests: a new master reads their rows, checks them against the shard's
    seal and digests them, so its checksums equal those of a cache built from scratch; a rotten one is refused."""
    import featcache.shards

    with monkeypatch.context() as patch:
        patch.setattr(featcache.shards, "DIGEST_DATASETS", {})  # write shards as before they stored digests
        (first,) = extract_features(extract_config(small_xrays, shard_rows=16))
    assert all("pooled_digest" not in h5py.File(p, "r") for p in _shards(first.cache_path))
    extra = sorted((dev_data / "train" / "NORMAL").iterdir())[40]
    shutil.copyfile(extra, small_xrays / "train" / "NORMAL" / extra.name)
    (grown,) = extract_features(extract_config(small_xrays, shard_rows=16))
    assert grown.computed_rows > 0 and verify_cache(grown.cache_path).ok
    shutil.copyfile(extra, small_xrays / "train" / "NORMAL" / f"again-{extra.name}")
    with h5py.File(_shards(first.cache_path)[0], "r+") as handle:
        handle["features"][0] += 1
    with pytest.raises(DamagedFileError, match="/features does not match the SHA-256 recorded when it was written"):
        extract_features(extract_config(small_xrays, shard_rows=16))


def test_edited_row_digests_of_a_shard_are_refused_when_a_master_is_sealed(small_xrays, extract_config, dev_data):
    """The stored row digests are what a new master's checksums are made of: they are checked against the shard's
    seal each time, so editing them (to match edited maps) cannot launder rows either."""
    (first,) = extract_features(extract_config(small_xrays, shard_rows=16))
    with h5py.File(_shards(first.cache_path)[0], "r+") as handle:
        handle["pooled_digest"][0] = b"\x00" * 16
    extra = sorted((dev_data / "train" / "NORMAL").iterdir())[40]
    shutil.copyfile(extra, small_xrays / "train" / "NORMAL" / extra.name)
    before = first.cache_path.read_bytes()
    with pytest.raises(DamagedFileError, match="/pooled_digest does not match the SHA-256 recorded when it was"):
        extract_features(extract_config(small_xrays, shard_rows=16))
    assert first.cache_path.read_bytes() == before


def test_a_cache_checksummed_as_one_stream_still_reads_and_refuses_edits(synthetic_cache, monkeypatch):
    """Caches written before the ``rows`` scheme record no scheme: readers follow what the manifest says."""
    import featcache.cachewrite

    monkeypatch.setattr(featcache.cachewrite, "BY_ROW", ())
    path = synthetic_cache()
    records = read_manifest(path)["datasets"]
    assert "scheme" not in records["pooled"] and "scheme" not in records["features"]
    assert len(load_pooled(path).pooled) > 0 and verify_cache(path).ok
    with h5py.File(path, "r+") as handle:
        handle["pooled"][0, 0] += 1
    assert not verify_cache(path).ok
    with pytest.raises(DamagedFileError, match="does not match the SHA-256"):
        load_pooled(path, ("train", "val", "test"))


def _change_files(data, dev_data):
    """Three new train files, one test file removed, one test file's content replaced."""
    for file in sorted((dev_data / "train" / "NORMAL").iterdir())[40:43]:
        shutil.copyfile(file, data / "train" / "NORMAL" / file.name)
    sorted((data / "test" / "PNEUMONIA").iterdir())[0].unlink()
    changed = sorted((data / "test" / "NORMAL").iterdir())[0]
    shutil.copyfile(sorted((dev_data / "test" / "NORMAL").iterdir())[30], changed)


def test_incremental_add_change_remove_writes_only_new_shards_and_equals_a_clean_build(
        small_xrays, extract_config, dev_data, tmp_path):
    config = extract_config(small_xrays, shard_rows=16)
    (first,) = extract_features(config)
    before = {p: p.stat().st_mtime_ns for p in _shards(first.cache_path)}
    _change_files(small_xrays, dev_data)
    (second,) = extract_features(config)
    after = _shards(second.cache_path)
    assert all(p in after and p.stat().st_mtime_ns == t for p, t in before.items()), "old shards untouched"
    new = [p for p in after if p not in before]
    assert len(new) == 1 and h5py.File(new[0], "r")["path"].shape[0] == second.computed_rows
    (tmp_path / "clean").mkdir()
    shutil.copyfile(tmp_path / "cache" / "split-seed0.json", tmp_path / "clean" / "split-seed0.json")  # same split
    (clean,) = extract_features(extract_config(small_xrays, cache_dir=tmp_path / "clean", shard_rows=16))
    assert_same_datasets(second.cache_path, clean.cache_path, float_tolerance=1e-5)
    assert verify_cache(second.cache_path).ok
    # the removed and the changed file's old rows stay in their shards until compaction
    mapped = sum(entry["rows"] for entry in read_manifest(second.cache_path)["shards"])
    assert mapped == second.counts["rows"] + 2
    # compaction: one plain file, same datasets and checksums, the shards gone
    datasets = read_datasets(second.cache_path)
    summary = compact_path(second.cache_path)
    assert summary.merged == [(second.cache_path, second.counts["rows"], len(after))]
    assert summary.removed == len(after) and not (second.cache_path.parent / f"{second.cache_path.stem}.shards").exists()
    with h5py.File(second.cache_path, "r") as handle:
        assert not handle["features"].is_virtual
    compacted = read_datasets(second.cache_path)
    assert datasets.keys() == compacted.keys() and all(np.array_equal(datasets[k], compacted[k]) for k in datasets)
    assert verify_cache(second.cache_path).ok
    # a compacted cache grows again: its rows go into shards once, the new rows are computed
    extra = sorted((dev_data / "train" / "PNEUMONIA").iterdir())[60]
    shutil.copyfile(extra, small_xrays / "train" / "PNEUMONIA" / extra.name)
    (third,) = extract_features(config)
    assert third.computed_rows in (1, 3) and third.reused_rows == second.counts["rows"]
    (tmp_path / "clean2").mkdir()
    shutil.copyfile(tmp_path / "cache" / "split-seed0.json", tmp_path / "clean2" / "split-seed0.json")  # same split
    (clean,) = extract_features(extract_config(small_xrays, cache_dir=tmp_path / "clean2"))
    assert_same_datasets(third.cache_path, clean.cache_path, float_tolerance=1e-5)


def test_prune_deletes_only_shards_no_master_maps(small_xrays, extract_config, tmp_path):
    (summary,) = extract_features(extract_config(small_xrays, shard_rows=16))
    folder = summary.cache_path.parent
    shards = _shards(summary.cache_path)
    stray = shards[0].with_name("0" * 24 + ".h5")
    shutil.copyfile(shards[0], stray)  # e.g. left by a run whose files were then removed
    other = folder / "tiny-keptcopy.h5"
    shutil.copyfile(summary.cache_path, other)  # a second master mapping the same shards
    assert compact_path(folder, prune_only=True).removed == 1 and not stray.exists()
    summary_ = compact_path(summary.cache_path)
    assert [m[0] for m in summary_.merged] == [summary.cache_path] and summary_.removed == 0
    assert all(p.exists() for p in shards), "the other master still maps them"
    with open_cache(other) as handle:
        assert handle["features"].is_virtual
    (folder / f"{summary.cache_path.stem}.partial").mkdir()  # an unfinished extract: its shards are work
    other.unlink()
    assert compact_path(folder, prune_only=True).removed == 0
    (folder / f"{summary.cache_path.stem}.partial").rmdir()
    assert compact_path(folder, prune_only=True).removed == len(shards)


def _rows_done(folder):
    return 4 * len(list(folder.glob("*.partial/*.npz"))) + 8 * len(list(folder.glob("*.shards/*.h5")))


def test_sigkill_while_packing_shards_then_resume_equals_a_clean_run(dev_data, tmp_path):
    """Shards of 8 rows and batches of 4: kills land while batches are written, packed into shards, and
    deleted, at seeded random points; every rerun ends with the clean run's datasets and no leftovers."""
    data = copy_subset(dev_data, tmp_path / "xrays", {
        "train/NORMAL": 8, "train/PNEUMONIA": 12, "test/NORMAL": 5, "test/PNEUMONIA": 5})
    args = [sys.executable, "-m", "featcache", "extract", "--data", str(data), "--backbone", "tiny",
            "--weights", "random", "--image-size", "96", "--augment-copies", "2", "--batch-size", "4",
            "--shard-rows", "8", "--no-progress"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    clean = subprocess.run(args + ["--cache-dir", str(tmp_path / "clean")], env=env, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    for n in [1, *sorted(random.Random(9).sample(range(2, 12), 2))]:
        folder = tmp_path / f"killed-{n}"
        proc = subprocess.Popen(args + ["--cache-dir", str(folder)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and _rows_done(folder) < 4 * n:
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert list_caches(folder) == []
        resumed = subprocess.run(args + ["--cache-dir", str(folder)], env=env, capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr
        assert_same_datasets(list_caches(folder)[0], list_caches(tmp_path / "clean")[0])
        assert not list(folder.glob("*.partial")) and not list(folder.glob("**/*.incomplete"))
        assert verify_cache(list_caches(folder)[0]).ok


def test_a_kill_between_a_shards_rename_and_its_batches_deletion_leaves_no_duplicate_rows(
        small_xrays, extract_config, monkeypatch, tmp_path):
    import featcache.partial
    from featcache.shards import write_shard

    (clean,) = extract_features(extract_config(small_xrays, cache_dir=tmp_path / "clean", shard_rows=16))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # a kill before any packing: every batch is in .partial/

    monkeypatch.setattr(featcache.partial.ShardPacker, "pack", killed)
    with pytest.raises(KeyboardInterrupt):
        extract_features(extract_config(small_xrays, shard_rows=16))
    monkeypatch.undo()
    (partial,) = (tmp_path / "cache").glob("*.partial")
    done = sum(len(np.load(b)["path"]) for b in partial.glob("*.npz"))
    batches = sorted(partial.glob("*.npz"))[:2]
    arrays = [dict(np.load(b)) for b in batches]
    keys = [(p, s, int(k)) for a in arrays for p, s, k in zip(a["path"].tolist(), a["sha256"].astype(str).tolist(),
                                                              a["copy_index"])]
    # the state a kill right after a shard's rename leaves: the shard in place, its batches still there
    write_shard(tmp_path / "cache" / f"{clean.cache_path.stem}.shards", read_manifest(clean.cache_path)["fingerprint"],
                np.concatenate([a["features"] for a in arrays]), np.concatenate([a["pooled"] for a in arrays]), keys)
    (resumed,) = extract_features(extract_config(small_xrays, shard_rows=16))
    assert resumed.computed_rows == resumed.counts["rows"] - done and not any(b.exists() for b in batches)
    shards = read_manifest(resumed.cache_path)["shards"]
    assert sum(entry["rows"] for entry in shards) == resumed.counts["rows"]  # no row stored twice
    assert_same_datasets(resumed.cache_path, clean.cache_path)


def test_batches_waiting_for_their_shard_never_exceed_one_shard(small_xrays, extract_config, monkeypatch):
    """Peak disk during extract: the shards plus at most one shard's worth of batches (never a second copy)."""
    from featcache.partial import ShardPacker

    real, waiting = ShardPacker.write, []

    def write(self, *args, **kwargs):
        real(self, *args, **kwargs)
        waiting.append(self.store.pending_rows())

    monkeypatch.setattr(ShardPacker, "write", write)
    (summary,) = extract_features(extract_config(small_xrays, shard_rows=16, batch_size=8))
    assert len(waiting) == 9 and max(waiting) <= 16 - 1  # packed as soon as 16 rows wait
    assert sum(entry["rows"] for entry in read_manifest(summary.cache_path)["shards"]) == summary.counts["rows"]


def test_a_format_2_cache_is_read_as_it_is(synthetic_cache):
    path = synthetic_cache()
    with h5py.File(path, "r+") as handle:  # a plain cache of format 2 has exactly this layout
        handle.attrs["format_version"] = 2
    assert len(load_pooled(path).pooled) > 0 and verify_cache(path).ok


def test_compact_on_the_command_line(small_xrays, extract_config, tmp_path):
    (summary,) = extract_features(extract_config(small_xrays, shard_rows=16))
    result = run_cli("compact", summary.cache_path.parent)
    assert result.exit_code == 0 and "70 rows from 5 shard files merged" in result.output
    assert "removed 5 unused shard files" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("compact", empty)
    (line,) = [x for x in result.output.splitlines() if x.strip()]
    assert result.exit_code == 1 and "holds no cache to compact" in line and line.endswith(f"target={str(empty)!r}")


def test_extract_and_describe_suggest_compact_once_the_master_maps_many_runs(
        small_xrays, extract_config, dev_data, monkeypatch):
    import featcache.cache as cache
    from featcache.extract import format_summary

    def runs_in_file(path):
        with h5py.File(path, "r") as handle:
            return cache.mapped_runs(handle["features"])

    config = extract_config(small_xrays, shard_rows=16)
    (first,) = extract_features(config)
    assert first.mapped_runs == runs_in_file(first.cache_path) > 0
    _change_files(small_xrays, dev_data)
    (second,) = extract_features(config)  # the same file name: same settings
    assert second.mapped_runs == runs_in_file(second.cache_path)
    assert second.mapped_runs > first.mapped_runs  # the new rows sit between old ones
    assert f", {second.mapped_runs} runs of rows mapped)" in cache.describe_cache(second.cache_path)
    assert "featcache compact" not in format_summary(second) + cache.describe_cache(second.cache_path)
    monkeypatch.setattr(cache, "COMPACT_HINT_RUNS", first.mapped_runs)  # the bar between the two masters
    assert "featcache compact" not in format_summary(first)
    hint = f"/features maps {second.mapped_runs} runs of rows (many incremental extracts): 'featcache compact'"
    assert hint in format_summary(second) and hint in cache.describe_cache(second.cache_path)
    compact_path(second.cache_path)
    assert "featcache compact" not in cache.describe_cache(second.cache_path)


def test_train_head_gives_the_same_trials_on_a_sharded_and_a_compacted_cache(small_xrays, extract_config, tmp_path):
    """A sharded master's /pooled is virtual (no chunks of its own): train-head must cut it into the epoch blocks
    of the plain file it compacts to, and find the same trials."""
    from featcache.config import TrainHeadConfig
    from featcache.tune import train_head

    (summary,) = extract_features(extract_config(small_xrays, shard_rows=16))
    sharded = summary.cache_path
    assert h5py.File(sharded, "r")["pooled"].is_virtual
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    for path in (sharded, *sharded.parent.glob(f"{sharded.stem}.weights.h5")):
        shutil.copy2(path, plain_dir / path.name)
    shutil.copytree(sharded.parent / f"{sharded.stem}.shards", plain_dir / f"{sharded.stem}.shards")
    compact_path(plain_dir / sharded.name, False)
    plain = plain_dir / sharded.name
    assert not h5py.File(plain, "r")["pooled"].is_virtual

    def trials(path):
        config = TrainHeadConfig(cache_dir=path.parent, trials=2, max_epochs=4, patience=2, progress=False)
        result = train_head(path, config)
        shutil.rmtree(path.parent / "runs")
        return [(r["params"], r["val_roc_auc"], r["epochs"]) for r in result.rows]

    assert trials(sharded) == trials(plain)


def test_a_rerun_reads_only_the_keys_of_the_shards_its_master_maps(small_xrays, extract_config, monkeypatch):
    """The master's checksums cover the shards it maps: a rerun checks those through the master once and opens
    each shard for its keys only; a shard no master maps (a killed run's) is read whole and checked."""
    import featcache.shards

    config = extract_config(small_xrays, shard_rows=16)
    (first,) = extract_features(config)
    checked, real = [], featcache.shards.check_shard
    monkeypatch.setattr(featcache.shards, "check_shard", lambda path, *a: checked.append(path.name) or real(path, *a))
    stray = featcache.shards.write_shard(_shards(first.cache_path)[0].parent, read_manifest(first.cache_path)
                                         ["fingerprint"], np.zeros((1, 1, 1, 16), np.float16), np.zeros((1, 16)),
                                         [("train/NORMAL/gone.png", "0" * 64, 0)])
    (again,) = extract_features(config)
    assert again.computed_rows == 0 and again.reused_rows == first.counts["rows"]
    assert checked == [stray.name]


def test_row_index_finds_each_key_in_the_first_shard_by_name_and_nothing_else(tmp_path):
    from featcache.shards import RowIndex, row_digests

    keys = [("a.png", "1" * 64, 0), ("a.png", "1" * 64, 1), ("b.png", "2" * 64, 0)]
    digests = row_digests(keys)
    assert digests.dtype == np.dtype("S16") and len(set(digests.tolist())) == 3
    assert (row_digests([("a.png", "1" * 64, np.int16(1))]) == digests[1]).all()  # numpy ints key alike
    index = RowIndex([tmp_path / "x.h5", tmp_path / "y.h5"], [digests[[2, 0]], digests[[0, 1]]])
    assert len(index) == 3
    files, number, offset = index.locate(digests)
    assert [files[n].name for n in number] == ["x.h5", "y.h5", "x.h5"] and offset.tolist() == [1, 1, 0]
    other = row_digests([("a.png", "1" * 64, 2)])
    assert index.find(other).tolist() == [-1] and not index.contains(other).any()
    with pytest.raises(KeyError, match="1 rows are in no shard"):
        index.locate(np.concatenate([digests, other]))
    assert RowIndex([], []).find(digests).tolist() == [-1, -1, -1]


def _mappings(dataset: h5py.Dataset) -> list:
    return [(m.vspace.get_regular_hyperslab(), m.file_name, m.dset_name, m.src_space.get_regular_hyperslab(),
             m.src_space.shape) for m in dataset.virtual_sources()]


def test_the_masters_mappings_are_those_of_h5pys_virtual_sources(tmp_path):
    from featcache.master import _set_mappings, mapping_runs

    rng = np.random.default_rng(0)
    sizes = [5, 7, 3]
    for i, rows in enumerate(sizes):
        with h5py.File(tmp_path / f"s{i}.h5", "w") as handle:
            handle["features"] = rng.random((rows, 2, 2, 3)).astype(np.float16)
            handle["pooled"] = rng.random((rows, 3)).astype(np.float32)
    sources = [(s, o) for s, rows in enumerate(sizes) for o in range(rows)]
    random.Random(0).shuffle(sources)
    sources = sorted(sources[:6]) + sources[6:]  # some long runs, some single rows
    runs = mapping_runs(sources)
    assert sum(b - a for a, b, _, _ in runs) == len(sources)
    assert all(sources[a + k] == (s, f + k) for a, b, s, f in runs for k in range(b - a))
    assert mapping_runs([]) == [] and mapping_runs([(0, 4)]) == [(0, 1, 0, 4)]
    shapes = {"features": (2, 2, 3), "pooled": (3,)}
    dtypes = {"features": "float16", "pooled": "float32"}
    for way in ("h5py", "ours"):
        with h5py.File(tmp_path / f"{way}.h5", "w") as handle:
            for name, shape in shapes.items():
                layout = h5py.VirtualLayout((len(sources), *shape), dtypes[name])
                if way == "ours":
                    _set_mappings(layout, name, runs, [f"s{i}.h5" for i in range(3)], sizes)
                else:
                    for start, stop, shard, first in runs:
                        layout[start:stop] = h5py.VirtualSource(f"s{shard}.h5", name, (sizes[shard], *shape))[
                            first:first + stop - start]
                handle.create_virtual_dataset(name, layout, fillvalue=np.nan)
    with h5py.File(tmp_path / "h5py.h5", "r") as theirs, h5py.File(tmp_path / "ours.h5", "r") as ours:
        for name in shapes:
            assert _mappings(ours[name]) == _mappings(theirs[name]) and len(_mappings(ours[name])) == len(runs)
            expected = [h5py.File(tmp_path / f"s{s}.h5", "r")[name][o] for s, o in sources]
            assert np.array_equal(ours[name][...], np.stack(expected))
