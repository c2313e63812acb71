"""A rerun of extract with nothing to do: told without TensorFlow (remembered weights hash), and any change
(weights, images, a lying memo, work of a killed run) still takes the full path and gives the right cache."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_same_datasets
from featcache import extract, uptodate, weightsmemo
from featcache.backbones import get_backbone_spec, load_backbone
from featcache.cache import list_caches
from featcache.errors import WeightsError
from featcache.extract import extract_features
from featcache.partial import ReusableCache, save_weights
from featcache.weightsmemo import MEMO_FILE

REPO = Path(__file__).resolve().parents[1]
# The CLI in a child process; at exit it says whether TensorFlow (or Keras) was ever imported.
CHILD = ("import atexit, sys; atexit.register(lambda: print('IMPORTED:', sorted(m for m in ('tensorflow', 'keras') "
         "if m in sys.modules))); from featcache.cli import app; sys.argv = ['featcache'] + sys.argv[1:]; app()")


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _refuse(*args, **kwargs):
    raise AssertionError("the backbone was built: not the path without TensorFlow")


def _without_seconds(output: str) -> str:
    return re.sub(r"MiB, [0-9.]+ s\)", "MiB)", output.split("IMPORTED:")[0])


def test_a_cli_rerun_with_nothing_to_do_never_imports_tensorflow(small_xrays, tmp_path):
    args = ["extract", "--data", small_xrays, "--backbone", "tiny", "--weights", "random", "--image-size", "64",
            "--augment-copies", "1", "--precision", "float32", "--no-progress", "--cache-dir", tmp_path / "cache"]
    first = _cli(*args)
    assert "IMPORTED: ['keras', 'tensorflow']" in first.stdout and "reused 0" in first.stdout
    (cache,) = list_caches(tmp_path / "cache")
    mtime = cache.stat().st_mtime_ns
    again = _cli(*args)
    assert "IMPORTED: []" in again.stdout, again.stdout
    assert "computed 0 rows" in again.stdout and cache.stat().st_mtime_ns == mtime
    (tmp_path / "cache" / MEMO_FILE).unlink()  # the full path: same report, word for word
    full = _cli(*args)
    assert "IMPORTED: ['keras', 'tensorflow']" in full.stdout
    assert _without_seconds(again.stdout) == _without_seconds(full.stdout)


def test_changed_or_new_images_take_the_full_path(small_xrays, extract_config, dev_data, tmp_path, monkeypatch):
    config = extract_config(small_xrays)
    (first,) = extract_features(config)
    changed = sorted((small_xrays / "test" / "NORMAL").iterdir())[0]
    shutil.copyfile(sorted((dev_data / "test" / "NORMAL").iterdir())[30], changed)
    (second,) = extract_features(config)
    assert second.computed_rows == 1 and second.cache_path == first.cache_path
    extra = sorted((dev_data / "train" / "NORMAL").iterdir())[40]
    shutil.copyfile(extra, small_xrays / "train" / "NORMAL" / extra.name)
    (third,) = extract_features(config)
    assert third.computed_rows >= 1 and third.reused_rows == second.counts["rows"]
    (clean,) = extract_features(extract_config(small_xrays, cache_dir=tmp_path / "clean"))
    assert_same_datasets(third.cache_path, clean.cache_path, float_tolerance=1e-5)
    monkeypatch.setattr(extract, "load_backbone", _refuse)
    (fourth,) = extract_features(config)  # nothing changed since: no backbone
    assert fourth.computed_rows == 0 and fourth.counts == third.counts


def _weights_file(path: Path, seed: int) -> Path:
    save_weights(load_backbone(get_backbone_spec("tiny"), 64, "random", seed), path)
    return path


def test_a_changed_weights_file_is_never_let_through(small_xrays, extract_config, tmp_path, monkeypatch):
    monkeypatch.setattr(weightsmemo, "RACY_SECONDS", 0)  # the file was written a moment ago
    weights = _weights_file(tmp_path / "tiny.weights.h5", seed=3)
    config = extract_config(small_xrays, weights=str(weights), augment_copies=0)
    (first,) = extract_features(config)
    with monkeypatch.context() as patch:
        patch.setattr(extract, "load_backbone", _refuse)
        (same,) = extract_features(config)
        assert same.computed_rows == 0 and same.cache_path == first.cache_path
        os.utime(weights, ns=(1, 1))  # a new stat key, the same content: hashed again, still no backbone
        (touched,) = extract_features(config)
        assert touched.computed_rows == 0 and touched.cache_path == first.cache_path
    _weights_file(weights, seed=4)  # other weights under the same name: a new fingerprint
    (other,) = extract_features(config)
    assert other.cache_path != first.cache_path and other.computed_rows == first.counts["rows"]
    weights.write_bytes(b"not a weights file")
    with pytest.raises(WeightsError, match="does not fit tiny"):
        extract_features(config)


def test_a_memo_that_lies_costs_only_time(small_xrays, extract_config, tmp_path):
    config = extract_config(small_xrays, augment_copies=0)
    (first,) = extract_features(config)
    memo = tmp_path / "cache" / MEMO_FILE
    record = json.loads(memo.read_text())
    for entry in record["entries"].values():
        entry["weights_sha256"] = "0" * 64
    memo.write_text(json.dumps(record))
    (again,) = extract_features(config)  # no cache of that fingerprint: the full path, which finds the real one
    assert again.cache_path == first.cache_path and again.computed_rows == 0
    memo.write_text("{not json")
    (damaged,) = extract_features(config)
    assert damaged.cache_path == first.cache_path and damaged.computed_rows == 0
    assert json.loads(memo.read_text())["format"] == "featcache-weights-hashes", "rewritten by the full path"


def test_work_of_a_killed_run_or_a_deleted_cache_take_the_full_path(small_xrays, extract_config, monkeypatch):
    config = extract_config(small_xrays, augment_copies=0)
    (first,) = extract_features(config)
    calls, build = [], extract.load_backbone
    monkeypatch.setattr(extract, "load_backbone", lambda *a, **k: calls.append(a) or build(*a, **k))
    partial = first.cache_path.with_name(f"{first.cache_path.stem}.partial")
    partial.mkdir()
    (again,) = extract_features(config)
    assert len(calls) == 1 and again.computed_rows == 0 and not partial.exists(), "the full path cleans up"
    first.cache_path.unlink()
    (rebuilt,) = extract_features(config)
    assert len(calls) == 2 and rebuilt.computed_rows == 0 and rebuilt.cache_path.is_file()  # from the shards
    (quiet,) = extract_features(config)
    assert len(calls) == 2 and quiet.computed_rows == 0


def test_gpu_device_nodes_leave_auto_precision_to_tensorflow(monkeypatch):
    monkeypatch.setattr(extract.glob, "glob", lambda pattern: ["/dev/nvidia0"] if "nvidia" in pattern else [])
    assert extract._precision_without_tensorflow("auto") is None
    assert extract._precision_without_tensorflow("mixed") == "mixed"
    monkeypatch.setattr(extract.glob, "glob", lambda pattern: [])
    assert extract._precision_without_tensorflow("auto") == ("float32" if sys.platform.startswith("linux") else None)


def test_bad_files_are_reported_the_same_without_tensorflow(small_xrays, extract_config, bad_inputs, monkeypatch):
    shutil.copyfile(bad_inputs / "truncated.jpeg", small_xrays / "train" / "PNEUMONIA" / "broken.jpeg")
    config = extract_config(small_xrays, augment_copies=0)
    (first,) = extract_features(config)
    assert [s["path"] for s in first.skipped] == ["train/PNEUMONIA/broken.jpeg"]
    monkeypatch.setattr(extract, "load_backbone", _refuse)
    (again,) = extract_features(config)
    assert again.computed_rows == 0 and again.skipped == first.skipped and again.counts == first.counts
    assert extract.format_summary(again).split("  skipped ")[1] == extract.format_summary(first).split("  skipped ")[1]


def test_added_images_are_told_by_the_row_count_before_the_cache_is_checked(small_xrays, extract_config, dev_data,
                                                                            monkeypatch):
    config = extract_config(small_xrays, augment_copies=1)
    (first,) = extract_features(config)
    opened = []

    class Counting:  # uptodate's ReusableCache only: the full path opens the cache as always
        @staticmethod
        def open(*args):
            opened.append(args)
            return ReusableCache.open(*args)

    monkeypatch.setattr(uptodate, "ReusableCache", Counting)
    extra = sorted((dev_data / "train" / "NORMAL").iterdir())[40]
    shutil.copyfile(extra, small_xrays / "train" / "NORMAL" / extra.name)
    (grown,) = extract_features(config)
    assert opened == [] and grown.computed_rows >= 1 and grown.counts["rows"] > first.counts["rows"]
    monkeypatch.setattr(extract, "load_backbone", _refuse)
    (same,) = extract_features(config)  # the same count: checked in full, and nothing to do
    assert len(opened) == 1 and same.computed_rows == 0 and same.counts == grown.counts
    (small_xrays / "train" / "NORMAL" / extra.name).unlink()
    monkeypatch.undo()
    (shrunk,) = extract_features(config)
    assert shrunk.counts == first.counts and shrunk.computed_rows == 0
