"""train-head within --memory-budget: streamed epochs equal the in-memory ones (trials, metrics, saved head,
statistics), the probe stays bounded and deterministic, and budgets are parsed with one-line errors."""

import dataclasses
import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from featcache import views
from featcache.cli import app
from featcache.config import TrainHeadConfig, parse_memory_budget
from featcache.errors import FeatcacheError
from featcache.head import epoch_rows, epoch_windows, sample_views
from featcache.runs import load_head_record, run_dir_for
from featcache.tune import train_heads
from featcache.views import load_head_data, probe_rows, read_train_rows

FAST = dict(max_epochs=6, patience=3, progress=False)
WHOLE = 2**40  # a budget every test cache fits
# The cache of these tests: 500 train images x 5 views + 2,200 val + 50 test = 4,750 rows of 16 channels (64 bytes)
# in /pooled chunks of 1,024 rows; with 64 KiB windows (one chunk) each epoch pass is read in 4 windows (the
# 4 chunks holding training rows).
ROW_BYTES, TRAIN_ROWS, VAL_ROWS = 64, 2500, 2200
HELD_VAL = 700_000  # streams (below 3 x 4,700 rows), holds the validation rows and probes every view
STREAMED_VAL = 270_000  # streams the validation rows too, and probes a subsample of one view per image


@pytest.fixture
def small_windows(monkeypatch):
    monkeypatch.setattr(views, "SHUFFLE_WINDOW_BYTES", 1024 * ROW_BYTES)


def _cache(synthetic_cache, cache_dir, **overrides):
    path = synthetic_cache(cache_dir=cache_dir, n_train=500, n_val=VAL_ROWS, n_test=50, copies=4,
                           feature_shape=(1, 1, 16), separation=0.8, dtype="float32", **overrides)
    with h5py.File(path, "r+") as handle:  # test rows: a read of one into training would show as NaN
        pooled = handle["pooled"][...]
        pooled[handle["split"][...] == 2] = np.nan
        handle["pooled"][...] = pooled
    return path


def _run(path, budget, trials=3, seed=5):
    (summary,) = train_heads(TrainHeadConfig(cache=path, cache_dir=path.parent, trials=trials, seed=seed,
                                             memory_budget=budget, **FAST))
    rows = [json.loads(line) for line in (run_dir_for(path) / "trials.jsonl").read_text().splitlines()]
    return summary, [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def _head_weights(path):
    import keras

    head = keras.saving.load_model(load_head_record(path)["head_path"], safe_mode=True)
    return head.get_weights()


def test_the_layout_splits_the_test_cache_into_windows(synthetic_cache, tmp_path, small_windows):
    data = load_head_data(_cache(synthetic_cache, tmp_path / "c"), memory_budget=HELD_VAL)
    assert data.streamed and data.train.layout.block_rows == 1024 and data.train.layout.window_blocks == 1
    windows = epoch_windows(data.train.source_index, 64, np.random.default_rng(0), data.train.layout)
    blocks = np.unique(data.train.layout.file_rows // 1024)
    assert len(blocks) == 4 and len(windows) == 4  # 500 images: 8 batches of 64 in one pass, a window per block
    assert sorted(np.concatenate([w for _, w in windows]).tolist()) == sorted(sample_views(
        data.train.source_index, np.random.default_rng(0)).tolist())  # one view of every image
    for blocks, rows in windows:
        assert (data.train.layout.file_rows[rows] // 1024 == blocks[0]).all()
    # every window's views as streamed are the views held in memory
    whole = load_head_data(data.path)
    for (_, rows), streamed in zip(windows, data.train.stream(windows)):
        np.testing.assert_array_equal(streamed, whole.train.pooled[rows])
    assert not np.isnan(read_train_rows(data, None)).any()


def test_one_window_is_the_whole_shuffle_of_before(synthetic_cache, tmp_path):
    data = load_head_data(synthetic_cache(cache_dir=tmp_path / "c"))
    ((blocks, rows),) = epoch_windows(data.train.source_index, 512, np.random.default_rng(3), data.train.layout)[:1]
    np.testing.assert_array_equal(rows, sample_views(data.train.source_index, np.random.default_rng(3)))
    a = epoch_rows(data.train.source_index, 64, np.random.default_rng(4))
    b = np.concatenate([r for _, r in epoch_windows(data.train.source_index, 64, np.random.default_rng(4),
                                                    data.train.layout)])
    np.testing.assert_array_equal(a, b)


def test_one_pass_statistics_equal_the_in_memory_ones(synthetic_cache, tmp_path, small_windows):
    path = _cache(synthetic_cache, tmp_path / "c", offset=50.0, scale=1e-2)  # badly scaled: float64 sums matter
    whole, streamed = load_head_data(path), load_head_data(path, memory_budget=HELD_VAL)
    assert streamed.streamed and not whole.streamed
    np.testing.assert_array_equal(streamed.stats.mean, whole.stats.mean)
    np.testing.assert_array_equal(streamed.stats.variance, whole.stats.variance)
    with h5py.File(path, "r") as handle:
        train = handle["pooled"][...][handle["split"][...] == 0].astype(np.float64)
    np.testing.assert_allclose(streamed.stats.mean, train.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(streamed.stats.variance, train.var(axis=0), rtol=1e-5)


@pytest.mark.parametrize("budget", [HELD_VAL, STREAMED_VAL])
def test_streamed_training_equals_the_in_memory_one(synthetic_cache, tmp_path, small_windows, budget):
    whole_path = _cache(synthetic_cache, tmp_path / "whole")
    streamed_path = _cache(synthetic_cache, tmp_path / "streamed")
    whole, whole_rows = _run(whole_path, WHOLE)
    streamed, streamed_rows = _run(streamed_path, budget)
    assert load_head_data(streamed_path, budget).streamed
    assert isinstance(load_head_data(streamed_path, budget).val_pooled, np.ndarray) == (budget == HELD_VAL)
    assert streamed_rows == whole_rows and len(whole_rows) == 3  # same parameters, seeds, epochs, metrics
    assert streamed.best["number"] == whole.best["number"] and streamed.threshold == whole.threshold
    assert streamed.val_metrics == whole.val_metrics
    for a, b in zip(_head_weights(whole_path), _head_weights(streamed_path)):
        np.testing.assert_array_equal(a, b)
    if budget == HELD_VAL:  # the probe too, when the budget holds every view
        assert streamed.probe.train_rows == whole.probe.train_rows == TRAIN_ROWS
        np.testing.assert_array_equal(streamed.probe.coef, whole.probe.coef)


def test_probe_is_bounded_by_the_budget_and_deterministic(synthetic_cache, tmp_path, small_windows):
    path = _cache(synthetic_cache, tmp_path / "c")
    data = load_head_data(path, memory_budget=STREAMED_VAL)
    rows = probe_rows(data)
    assert len(rows) * ROW_BYTES <= STREAMED_VAL // 2  # the probe's rows fit half the budget
    assert len(np.unique(data.train.source_index[rows])) == len(rows) == 500  # one view per image
    np.testing.assert_array_equal(rows, probe_rows(load_head_data(path, memory_budget=STREAMED_VAL)))
    tighter = dataclasses.replace(data, memory_budget=40_000)  # room for 312 rows: fewer than the images
    picked = probe_rows(tighter)
    assert len(picked) == 40_000 // 2 // ROW_BYTES == len(np.unique(data.train.source_index[picked]))
    assert len(read_train_rows(tighter, picked)) == len(picked)
    (first,), (second,) = (train_heads(TrainHeadConfig(cache=path, cache_dir=path.parent, trials=1, seed=seed,
                                                       memory_budget=STREAMED_VAL, **FAST))
                           for seed in (0, 1))  # the second reads probe.json; fit again to compare:
    (run_dir_for(path) / "probe.json").unlink()
    (third,) = train_heads(TrainHeadConfig(cache=path, cache_dir=path.parent, trials=2, seed=9,
                                           memory_budget=STREAMED_VAL, **FAST))
    assert first.probe.train_rows == third.probe.train_rows == 500
    np.testing.assert_array_equal(first.probe.coef, third.probe.coef)  # independent of --seed
    assert first.probe.val_scores["roc_auc"] > 0.6


def test_budget_too_small_to_stream_is_refused(synthetic_cache, tmp_path, small_windows):
    path = _cache(synthetic_cache, tmp_path / "c")
    with pytest.raises(FeatcacheError, match=r"too small to stream .* at least 262144 bytes \(0.2 MiB\). Received: memory_budget=100000$"):
        load_head_data(path, memory_budget=100_000)


@pytest.mark.parametrize("text, expected", [("2GiB", 2 * 2**30), ("512mib", 512 * 2**20), ("1.5GB", 1_500_000_000),
                                            ("800M", 800 * 2**20), ("1073741824", 2**30), (" 64 KiB ", 65536)])
def test_memory_budget_sizes(text, expected):
    assert parse_memory_budget(text) == expected


@pytest.mark.parametrize("text", ["abc", "0", "-1GiB", "2XB", "", "0.1", "1e9"])
def test_bad_memory_budget_is_one_red_line(synthetic_cache, tmp_path, text):
    with pytest.raises(FeatcacheError, match=f"Received: memory_budget={text!r}$"):
        parse_memory_budget(text)
    path = synthetic_cache(cache_dir=tmp_path / "cache")
    result = CliRunner().invoke(app, ["train-head", "--cache-dir", str(path.parent), "--no-progress",
                                      "--memory-budget", text])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "--memory-budget must be a positive size" in result.output and not (path.parent / "runs").exists()
    with pytest.raises(FeatcacheError, match="memory_budget must be a positive number of bytes"):
        TrainHeadConfig(memory_budget=0)


def test_damaged_chunks_are_one_line_whether_checked_or_streamed(synthetic_cache, tmp_path, small_windows):
    from conftest import corrupt_chunks

    from featcache.errors import DamagedFileError

    path = _cache(synthetic_cache, tmp_path / "c")
    data = load_head_data(path, memory_budget=HELD_VAL)  # checked in its first pass
    windows = epoch_windows(data.train.source_index, 64, np.random.default_rng(0), data.train.layout)
    corrupt_chunks(path, "pooled")  # rotten after the check: HDF5's fletcher32 catches it in the stream
    with pytest.raises(DamagedFileError, match=r"/pooled cannot be read .*Received: dataset='pooled'$"):
        list(data.train.stream(windows))
    with pytest.raises(DamagedFileError, match="pooled"):
        load_head_data(path, memory_budget=HELD_VAL)
