import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import assert_same_datasets, copy_subset
from featcache.cache import list_caches, open_cache, read_manifest
from featcache.cachewrite import CacheLock
from featcache.errors import CacheLockedError
from featcache.extract import extract_features


def test_extract_writes_a_self_describing_cache(small_xrays, extract_config):
    (summary,) = extract_features(extract_config(small_xrays))
    manifest = read_manifest(summary.cache_path)
    counts = manifest["counts"]
    assert counts["train"] + counts["val"] == 24 and counts["test"] == 8
    assert counts["train_copies"] == 2 * counts["train"] and counts["rows"] == 32 + counts["train_copies"]
    assert manifest["class_names"] == ["NORMAL", "PNEUMONIA"] and manifest["feature_shape"] == [2, 2, 16]
    for key in ("fingerprint", "weights", "image_size", "preprocessing", "resize", "augment", "seed", "skipped",
                "versions", "featcache_version", "format_version", "dtype"):
        assert key in manifest, key
    with open_cache(summary.cache_path) as handle:
        features, pooled = handle["features"][...], handle["pooled"][...]
        split, copy, source = handle["split"][...], handle["copy_index"][...], handle["source_index"][...]
        paths = handle["files/path"].asstr()[...]
        patients = handle["files/patient"].asstr()[...]
        labels, file_split = handle["labels"][...], handle["files/split"][...]
    assert features.shape == (counts["rows"], 2, 2, 16) and features.dtype == np.float16
    np.testing.assert_allclose(features.astype(np.float32).mean(axis=(1, 2)), pooled, rtol=2e-3, atol=2e-3)
    assert (copy[split != 0] == 0).all(), "only train images have augmented copies"
    assert set(np.unique(copy[split == 0])) == {0, 1, 2}
    assert all(paths[s].startswith("test/") == (sp == 2) for s, sp in zip(source, split))
    assert all(("PNEUMONIA" in paths[s]) == bool(lab) for s, lab in zip(source, labels))
    assert not set(patients[file_split == 0]) & set(patients[file_split == 1]), "a patient in train and val"
    # augmented copies differ from their original
    first = np.flatnonzero((split == 0) & (copy == 0))[0]
    assert not np.array_equal(features[first], features[first + 1])


def test_two_runs_give_identical_caches_and_a_rerun_computes_nothing(small_xrays, extract_config, tmp_path):
    (a,) = extract_features(extract_config(small_xrays, cache_dir=tmp_path / "a"))
    (b,) = extract_features(extract_config(small_xrays, cache_dir=tmp_path / "b"))
    assert a.cache_path.name == b.cache_path.name
    assert_same_datasets(a.cache_path, b.cache_path)
    mtime = a.cache_path.stat().st_mtime_ns
    (again,) = extract_features(extract_config(small_xrays, cache_dir=tmp_path / "a"))
    assert again.computed_rows == 0 and again.reused_rows == a.counts["rows"]
    assert a.cache_path.stat().st_mtime_ns == mtime, "an up-to-date cache is not rewritten"


def test_incremental_add_change_remove(small_xrays, extract_config, dev_data, tmp_path):
    config = extract_config(small_xrays)
    (first,) = extract_features(config)
    extra = sorted((dev_data / "train" / "NORMAL").iterdir())[40:43]
    for file in extra:
        shutil.copyfile(file, small_xrays / "train" / "NORMAL" / file.name)
    removed = sorted((small_xrays / "test" / "PNEUMONIA").iterdir())[0]
    removed.unlink()
    changed = sorted((small_xrays / "test" / "NORMAL").iterdir())[0]
    shutil.copyfile(sorted((dev_data / "test" / "NORMAL").iterdir())[30], changed)
    (second,) = extract_features(config)
    added = read_manifest(second.cache_path)
    new_train = sum(1 for f in extra if _split_of(second.cache_path, f"train/NORMAL/{f.name}") == "train")
    assert second.computed_rows == 3 + 2 * new_train + 1  # new originals + their copies + the changed file
    assert added["counts"]["test"] == 7
    (clean,) = extract_features(extract_config(small_xrays, cache_dir=tmp_path / "clean"))
    # Other batch compositions than a clean run: oneDNN may differ in the last float32 bit.
    assert_same_datasets(second.cache_path, clean.cache_path, float_tolerance=1e-5)


def test_feature_settings_get_their_own_cache(small_xrays, extract_config):
    (a,) = extract_features(extract_config(small_xrays))
    (b,) = extract_features(extract_config(small_xrays, image_size=96))
    (c,) = extract_features(extract_config(small_xrays, seed=1))
    assert len({a.cache_path, b.cache_path, c.cache_path}) == 3
    assert len(list_caches(a.cache_path.parent, "tiny")) == 3
    assert read_manifest(b.cache_path)["feature_shape"] == [3, 3, 16]
    assert (a.cache_path.parent / f"{a.cache_path.stem}.weights.h5").is_file()


def test_more_copies_later_compute_only_the_new_copies(small_xrays, extract_config):
    (two,) = extract_features(extract_config(small_xrays, augment_copies=2))
    (three,) = extract_features(extract_config(small_xrays, augment_copies=3))
    assert three.cache_path == two.cache_path
    assert three.computed_rows == two.counts["train"]


def test_bad_inputs_are_skipped_and_recorded(small_xrays, extract_config, bad_inputs):
    for file in bad_inputs.iterdir():
        shutil.copyfile(file, small_xrays / "train" / "PNEUMONIA" / file.name)
    (summary,) = extract_features(extract_config(small_xrays))
    skipped = {s["path"].rsplit("/", 1)[-1]: s["error"] for s in read_manifest(summary.cache_path)["skipped"]}
    assert set(skipped) == {"truncated.jpeg", "x.jpeg", "notes.jpeg"}
    assert "empty" in skipped["x.jpeg"] and summary.counts["train"] + summary.counts["val"] == 24
    (again,) = extract_features(extract_config(small_xrays))
    assert again.computed_rows == 0 and len(again.skipped) == 3


def test_float32_and_lzf(small_xrays, extract_config):
    (summary,) = extract_features(extract_config(small_xrays, dtype="float32", compression="lzf", augment_copies=0))
    with open_cache(summary.cache_path) as handle:
        (shard,) = {s.file_name for s in handle["features"].virtual_sources()}  # the maps are stored in the shard
        with h5py.File(summary.cache_path.parent / shard, "r") as stored:
            assert stored["features"].compression == "lzf"
        assert handle["features"].dtype == np.float32
        np.testing.assert_allclose(handle["features"][...].mean(axis=(1, 2)), handle["pooled"][...], rtol=1e-5)


def test_second_writer_gets_a_clear_error(small_xrays, extract_config, tmp_path):
    with CacheLock(tmp_path / "cache" / ".tiny.lock"):
        with pytest.raises(CacheLockedError, match="Another featcache process"):
            extract_features(extract_config(small_xrays))
    assert list_caches(tmp_path / "cache") == []


def test_sigkill_mid_run_then_resume_equals_a_clean_run(dev_data, tmp_path):
    data = copy_subset(dev_data, tmp_path / "xrays", {
        "train/NORMAL": 20, "train/PNEUMONIA": 40, "test/NORMAL": 10, "test/PNEUMONIA": 10})
    args = [sys.executable, "-m", "featcache", "extract", "--data", str(data), "--backbone", "tiny",
            "--weights", "random", "--image-size", "192", "--augment-copies", "3", "--batch-size", "4",
            "--no-progress"]
    killed = tmp_path / "killed"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(args + ["--cache-dir", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        partial = list(killed.glob("*.partial/*.npz"))
        if len(partial) >= 5:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list_caches(killed) == [], "a killed run must not leave a cache that looks complete"
    done_before = len(list(killed.glob("*.partial/*.npz")))
    resumed = subprocess.run(args + ["--cache-dir", str(killed)], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    rows = read_manifest(list_caches(killed)[0])["counts"]["rows"]
    computed = int(resumed.stdout.split("computed ")[1].split()[0])
    assert computed <= rows - 4 * (done_before - 1)  # at most the batches in flight were recomputed
    clean = subprocess.run(args + ["--cache-dir", str(tmp_path / "clean")], env=env, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    assert_same_datasets(list_caches(killed)[0], list_caches(tmp_path / "clean")[0])
    assert not list(killed.glob("*.partial")), "the work folder is removed once the cache is complete"


def _split_of(cache_path, rel_path):
    with open_cache(cache_path) as handle:
        paths = handle["files/path"].asstr()[...].tolist()
        return ("train", "val", "test")[handle["files/split"][paths.index(rel_path)]]



def test_mixed_precision_gets_its_own_cache_and_stays_close(small_xrays, extract_config):
    """The GPU default (mixed float16), run on the CPU: its own fingerprint, same storage dtypes."""
    (full,) = extract_features(extract_config(small_xrays, augment_copies=0, precision="float32"))
    (mixed,) = extract_features(extract_config(small_xrays, augment_copies=0, precision="mixed"))
    assert full.cache_path != mixed.cache_path
    assert read_manifest(mixed.cache_path)["precision"] == "mixed"
    with open_cache(full.cache_path) as a, open_cache(mixed.cache_path) as b:
        assert b["features"].dtype == np.float16 and b["pooled"].dtype == np.float32
        scale = np.abs(a["pooled"][...]).max()
        assert np.abs(a["pooled"][...] - b["pooled"][...]).max() <= 1e-2 * scale


def test_deleted_random_weights_are_restored_by_a_rerun(small_xrays, extract_config):
    (first,) = extract_features(extract_config(small_xrays, augment_copies=0))
    weights = first.cache_path.with_name(f"{first.cache_path.stem}.weights.h5")
    weights.unlink()
    (again,) = extract_features(extract_config(small_xrays, augment_copies=0))
    assert again.computed_rows == 0 and weights.is_file()


def test_a_repaired_file_leaves_the_skipped_list(small_xrays, extract_config, bad_inputs, dev_data):
    broken = small_xrays / "train" / "PNEUMONIA" / "broken.jpeg"
    shutil.copyfile(bad_inputs / "truncated.jpeg", broken)
    extract_features(extract_config(small_xrays))
    extra = sorted((dev_data / "train" / "NORMAL").iterdir())[50]
    shutil.copyfile(extra, small_xrays / "train" / "NORMAL" / extra.name)  # forces a reassembly
    (second,) = extract_features(extract_config(small_xrays))
    (entry,) = read_manifest(second.cache_path)["skipped"]
    assert entry["path"] == "train/PNEUMONIA/broken.jpeg" and len(entry["sha256"]) == 64  # still known bad
    shutil.copyfile(sorted((dev_data / "train" / "PNEUMONIA").iterdir())[60], broken)  # repaired
    (third,) = extract_features(extract_config(small_xrays))
    assert read_manifest(third.cache_path)["skipped"] == [] and third.computed_rows >= 1


def test_progress_bars_cover_hashing_and_the_backbone(small_xrays, extract_config, capsys):
    extract_features(extract_config(small_xrays, augment_copies=0, progress=True))
    err = capsys.readouterr().err
    assert "hash" in err and "32/32" in err  # 24 train + 8 test files hashed...
    assert "tiny" in err  # ...then the backbone's bar
    extract_features(extract_config(small_xrays, augment_copies=0, progress=False))
    assert capsys.readouterr().err == ""


def test_the_summary_gives_a_steady_rate_only_when_there_was_more_than_one_batch(tmp_path):
    from featcache.compute import ComputeTiming
    from featcache.extract import ExtractSummary, format_summary

    counts = {"train": 3, "val": 1, "test": 2, "train_copies": 3, "rows": 9}

    def computed(timing):
        summary = ExtractSummary(backbone="tiny", cache_path=tmp_path / "tiny.h5", counts=counts, skipped=[],
                                 computed_rows=9, reused_rows=0, seconds=3.0, size_bytes=0, timing=timing)
        return format_summary(summary).splitlines()[-1]

    assert computed(ComputeTiming(seconds=3.0, first_batch_seconds=2.0, first_batch_rows=4)) == \
        "  computed 9 rows at 3.0 img/s (5.0 after a 2.0 s first batch), reused 0"
    assert computed(ComputeTiming(seconds=3.0, first_batch_seconds=3.0, first_batch_rows=9)) == \
        "  computed 9 rows at 3.0 img/s (in one batch), reused 0"
