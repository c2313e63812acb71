"""The head search: quality on separable caches, outputs, determinism, resuming, refusals, head records."""

import json
import shutil
import sys

import h5py
import numpy as np
import pytest
from conftest import corrupt_chunks

from featcache.config import TrainHeadConfig
from featcache.errors import CacheMismatchError, FeatcacheError, IncompleteCacheError
from featcache.head import choose_threshold
from featcache.runs import check_head_matches_cache, load_head_record, run_dir_for
from featcache.tune import REFERENCE, load_head_data, train_heads

FAST = dict(max_epochs=8, patience=3, progress=False)


def _train(cache_dir, trials=3, **overrides):
    return train_heads(TrainHeadConfig(cache_dir=cache_dir, trials=trials, **{**FAST, **overrides}))


def _rows_without_seconds(run_dir):
    rows = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_separable_cache_gives_a_good_head_and_every_output(synthetic_cache, tmp_path):
    import keras

    path = synthetic_cache()
    (summary,) = _train(tmp_path / "cache", trials=4)
    run_dir = run_dir_for(path)
    assert summary.run_dir == run_dir and summary.best["val_roc_auc"] >= 0.95
    assert {p.name for p in run_dir.iterdir()} >= {"trials.csv", "trials.jsonl", "head.keras", "head.json",
                                                    "study.journal"}
    assert not list(run_dir.glob("*.tmp*"))
    csv_lines = (run_dir / "trials.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("number,state,pruned,collapsed,units,dropout")
    rows = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert rows[0]["number"] == 0 and rows[0]["params"] == REFERENCE.to_dict()  # the reference head first
    assert rows[1]["params"] == {**REFERENCE.to_dict(), "standardize": True}  # then it standardized
    for row in rows:
        assert set(row) >= {"val_loss", "val_accuracy", "val_roc_auc", "val_sensitivity", "val_specificity",
                            "epochs", "seconds", "pruned", "collapsed"}

    record = load_head_record(run_dir)
    manifest = check_head_matches_cache(record, path)
    assert record["cache_fingerprint"] == manifest["fingerprint"] and record["cache_file"] == path.name
    assert record["trial_number"] == summary.best["number"] and record["params"] == summary.best["params"]
    assert record["threshold_method"] == "youden" and 0 < record["threshold"] <= 1

    # The saved head takes the 7x7-style maps; on validation maps it reproduces the threshold's scores.
    head = keras.saving.load_model(record["head_path"], safe_mode=True)
    data = load_head_data(path)
    with h5py.File(path, "r") as handle:
        rows_val = np.flatnonzero((handle["split"][...] == 1) & (handle["copy_index"][...] == 0))
        maps = handle["features"][rows_val]
    probs = head.predict(maps, verbose=0)[:, 0]
    assert head.input_shape[1:] == tuple(manifest["feature_shape"])
    threshold, _ = choose_threshold(data.val_labels, probs)
    assert threshold == pytest.approx(record["threshold"], abs=1e-3)
    assert record["val_metrics"]["roc_auc"] == pytest.approx(summary.best["val_roc_auc"], abs=1e-6)


def test_load_reads_train_and_val_rows_only_and_never_the_maps(synthetic_cache):
    path = synthetic_cache(n_train=30, n_val=10, n_test=7, copies=3)
    with h5py.File(path, "r+") as handle:
        test_rows = handle["split"][...] == 2
        pooled = handle["pooled"][...]
        pooled[test_rows] = np.nan  # a read of any test row would show up as NaN
        handle["pooled"][...] = pooled
    corrupt_chunks(path, "features")  # and a read of the maps would fail (fletcher32)
    data = load_head_data(path)
    assert len(data.train.pooled) == 30 * 4 and len(data.val_pooled) == 10
    assert np.isfinite(data.train.pooled).all() and np.isfinite(data.val_pooled).all()
    assert len(np.unique(data.train.source_index)) == 30


def test_two_fresh_runs_give_the_same_trials(synthetic_cache, tmp_path):
    path = synthetic_cache(separation=0.7)  # not trivially separable, so trials differ
    twin = tmp_path / "twin" / path.name
    twin.parent.mkdir()
    shutil.copyfile(path, twin)
    _train(path.parent, trials=4, seed=7)
    _train(twin.parent, trials=4, seed=7)
    first, second = _rows_without_seconds(run_dir_for(path)), _rows_without_seconds(run_dir_for(twin))
    assert first == second
    assert len({json.dumps(row["params"], sort_keys=True) for row in first}) == 4


def test_more_trials_continue_the_study_and_keep_earlier_trials(synthetic_cache):
    path = synthetic_cache(separation=0.7)
    _train(path.parent, trials=3)
    before = _rows_without_seconds(run_dir_for(path))
    (summary,) = _train(path.parent, trials=5)
    after = _rows_without_seconds(run_dir_for(path))
    assert summary.new_trials == 2 and len(after) == 5 and after[:3] == before
    params = [json.dumps(row["params"], sort_keys=True) for row in after]
    assert len(set(params)) == 5  # the continued sampler does not replay the first run's draws
    (again,) = _train(path.parent, trials=5)  # nothing left to run: re-selects and re-saves the same head
    assert again.new_trials == 0 and again.best["number"] == summary.best["number"]
    assert again.val_metrics == summary.val_metrics and again.threshold == summary.threshold  # retrained exactly


def test_min_sensitivity_threshold(synthetic_cache):
    path = synthetic_cache(separation=0.7)
    (summary,) = _train(path.parent, trials=2, min_sensitivity=0.98)
    record = load_head_record(path)
    assert record["threshold_method"] == "min_sensitivity=0.98"
    assert record["val_metrics"]["sensitivity"] >= 0.98 and summary.val_metrics == record["val_metrics"]


def test_rdb_storage_url_holds_the_study(synthetic_cache, tmp_path):
    path = synthetic_cache()
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    _train(path.parent, trials=2, storage=url)
    assert (tmp_path / "studies.db").is_file() and not (run_dir_for(path) / "study.journal").exists()
    (summary,) = _train(path.parent, trials=3, storage=url)
    assert summary.new_trials == 1 and len(summary.rows) == 3


def _no_runs(cache_dir):
    return not (cache_dir / "runs").exists()


def test_refuses_missing_incomplete_and_other_format_caches(synthetic_cache, tmp_path):
    empty = tmp_path / "empty"
    with pytest.raises(FeatcacheError, match="No cache in"):
        _train(empty)
    (empty / "tiny-0123456789ab.partial").mkdir(parents=True)
    with pytest.raises(IncompleteCacheError, match="incomplete"):
        _train(empty)
    with pytest.raises(IncompleteCacheError, match="incomplete"):
        _train(empty, backbones=("tiny",))
    assert _no_runs(empty)

    path = synthetic_cache()
    with h5py.File(path, "r+") as handle:
        handle.attrs["complete"] = False  # as if the writer had been killed before its commit
    with pytest.raises(IncompleteCacheError, match="not marked complete"):
        _train(path.parent)
    with h5py.File(path, "r+") as handle:
        handle.attrs["complete"] = True
        handle.attrs["format_version"] = 99
    with pytest.raises(CacheMismatchError, match="format version 99"):
        _train(path.parent)
    assert _no_runs(path.parent)


def test_bad_storage_url_is_refused_without_writing(synthetic_cache, tmp_path):
    path = synthetic_cache()
    for url in ("nosuchscheme://x/y", f"sqlite:///{tmp_path}/no/such/dir/s.db"):
        with pytest.raises(FeatcacheError, match="Cannot open --storage") as info:
            _train(path.parent, storage=url)
        assert info.value.args[0].endswith(f"Received: storage={url!r}")
    assert _no_runs(path.parent)


def test_postgresql_url_without_its_driver_says_what_to_install(synthetic_cache, monkeypatch):
    path = synthetic_cache()
    for module in ("psycopg", "psycopg2"):
        monkeypatch.setitem(sys.modules, module, None)  # as where the postgres extra is not installed
    url = "postgresql://featcache:secret@127.0.0.1:1/featcache"
    with pytest.raises(FeatcacheError, match=r"pip install 'featcache\[postgres\]'") as info:
        _train(path.parent, storage=url)
    assert info.value.args[0].endswith("Received: storage='postgresql://featcache:***@127.0.0.1:1/featcache'")
    assert "secret" not in info.value.args[0] and _no_runs(path.parent)


def test_trials_must_be_positive():
    with pytest.raises(FeatcacheError, match="Received: trials=0"):
        TrainHeadConfig(trials=0)
    with pytest.raises(FeatcacheError, match="min_sensitivity"):
        TrainHeadConfig(min_sensitivity=1.5)
    with pytest.raises(FeatcacheError, match="Received: seed=-1"):
        TrainHeadConfig(seed=-1)


def test_head_of_another_cache_is_refused(synthetic_cache, tmp_path):
    path = synthetic_cache()
    other = synthetic_cache(cache_dir=tmp_path / "other", seed=1)
    _train(path.parent, trials=1)
    record = load_head_record(path)
    with pytest.raises(CacheMismatchError, match="was trained on cache"):
        check_head_matches_cache(record, other)
    head = run_dir_for(path) / "head.keras"
    head.write_bytes(head.read_bytes() + b"x")
    with pytest.raises(CacheMismatchError, match="is not the head"):
        load_head_record(path)
    with pytest.raises(FeatcacheError, match="No trained head"):
        load_head_record(other)


def test_several_caches_of_one_backbone_need_a_choice(synthetic_cache, tmp_path):
    first = synthetic_cache()
    synthetic_cache(seed=1)
    with pytest.raises(FeatcacheError, match="pass --cache FILE"):
        _train(first.parent)
    (summary,) = _train(first.parent, trials=1, cache=first)
    assert summary.cache_path == first
    with pytest.raises(FeatcacheError, match="is a tiny cache, not vgg16"):
        _train(first.parent, cache=first, backbones=("vgg16",))


def _poison(path, splits, value):
    with h5py.File(path, "r+") as handle:
        rows = np.isin(handle["split"][...], splits)
        pooled = handle["pooled"][...]
        pooled[rows] = value
        handle["pooled"][...] = pooled


def test_standardization_statistics_come_from_training_views_only(synthetic_cache, tmp_path):
    clean_path = synthetic_cache(cache_dir=tmp_path / "a")
    clean = load_head_data(clean_path)
    path = synthetic_cache(cache_dir=tmp_path / "b")
    _poison(path, (2,), 1e6)  # test rows (train-head never reads them; their checksum is not checked there)
    poisoned = load_head_data(path)
    np.testing.assert_array_equal(poisoned.stats.mean, clean.stats.mean)
    np.testing.assert_array_equal(poisoned.stats.variance, clean.stats.variance)
    with h5py.File(clean_path, "r") as handle:  # exactly the train-split rows (originals and copies), not val
        train_rows = handle["pooled"][...][handle["split"][...] == 0].astype(np.float64)
        val_rows = handle["pooled"][...][handle["split"][...] == 1].astype(np.float64)
    np.testing.assert_allclose(clean.stats.mean, train_rows.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(clean.stats.variance, train_rows.var(axis=0), rtol=1e-4)
    with_val = np.concatenate([train_rows, val_rows])
    assert not np.allclose(clean.stats.mean, with_val.mean(axis=0), rtol=1e-5)  # val rows would show


def test_badly_scaled_cache_is_learned_with_standardization(synthetic_cache, tmp_path):
    """Per-channel offsets of 100s and a spread of 1e-3: trial 1 (the reference head, standardized) learns it."""
    path = synthetic_cache(offset=100.0, scale=1e-3, dtype="float32")
    (summary,) = _train(tmp_path / "cache", trials=2, max_epochs=30, patience=5)
    reference, standardized = summary.rows
    assert standardized["params"]["standardize"] and not reference["params"]["standardize"]
    assert standardized["val_roc_auc"] >= 0.95 and not standardized["collapsed"]
    assert summary.best["number"] == 1 and summary.best["val_roc_auc"] >= summary.probe.val_scores["roc_auc"] - 0.02
    record = load_head_record(run_dir_for(path))
    assert record["params"]["standardize"] is True
    import keras

    head = keras.saving.load_model(record["head_path"], safe_mode=True)
    assert "Normalization" in [layer.__class__.__name__ for layer in head.layers]


def test_probe_is_recorded_deterministic_and_never_reads_test_rows(synthetic_cache, tmp_path):
    clean = synthetic_cache(cache_dir=tmp_path / "a", separation=1.0)
    poisoned = synthetic_cache(cache_dir=tmp_path / "b", separation=1.0)
    _poison(poisoned, (2,), np.nan)  # a read of a test row would show up as NaN
    (first,) = _train(tmp_path / "a", trials=1)
    (second,) = _train(tmp_path / "b", trials=1)
    assert first.probe.val_scores == second.probe.val_scores and first.probe.c == second.probe.c
    assert np.isfinite(second.probe.coef).all()
    record = load_head_record(run_dir_for(clean))
    assert record["probe"]["val_roc_auc"] == first.probe.val_scores["roc_auc"] and record["probe"]["c"] == first.probe.c
    assert (run_dir_for(clean) / "probe.json").is_file()
    # a rerun reads the saved probe rather than fitting it again
    (again,) = _train(tmp_path / "a", trials=1)
    np.testing.assert_array_equal(again.probe.coef, first.probe.coef)


def test_collapsed_trials_are_flagged_counted_and_ranked_last():
    from featcache.tune import is_collapsed, rank_trial

    assert is_collapsed(np.full(50, 0.5) + np.linspace(0, 1e-3, 50), 0.9)  # nearly constant, even if ranked well
    assert is_collapsed(np.linspace(0, 1, 50), 0.5)  # no better than chance
    assert not is_collapsed(np.linspace(0, 1, 50), 0.8)
    rows = [{"number": 0, "collapsed": True, "val_roc_auc": 0.99, "val_loss": 0.1},
            {"number": 1, "collapsed": False, "val_roc_auc": 0.80, "val_loss": 0.5}]
    assert min(rows, key=rank_trial)["number"] == 1


def test_summary_shows_collapsed_count_and_the_probe_floor(synthetic_cache, tmp_path):
    from featcache.tune import format_summary

    synthetic_cache(separation=0.0)  # no signal: the heads cannot beat chance by much
    (summary,) = _train(tmp_path / "cache", trials=3)
    text = format_summary(summary)
    collapsed = sum(r["collapsed"] for r in summary.rows)
    assert f"{collapsed} collapsed" in text and "linear probe" in text
    assert text.count("  collapsed") == sum(r["collapsed"] and not r["pruned"] for r in summary.rows)
    csv_rows = (run_dir_for(summary.cache_path) / "trials.csv").read_text().splitlines()[1:]
    assert [row.split(",")[3] for row in csv_rows] == [str(r["collapsed"]) for r in summary.rows]
