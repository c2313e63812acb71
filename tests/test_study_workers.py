"""Several ``train-head`` workers on one study: each reference trial runs once whoever asks first, the finished
trials add up to the requested count (plus at most the trials other workers have in flight when it is
reached), every trial reproduces from its recorded parameters and seed, and the saved head is the study's
best; on the default journal file and on a real PostgreSQL server."""

import os
import subprocess
import sys

import pytest

from featcache.cache import read_manifest
from featcache.config import TrainHeadConfig
from featcache.head import HeadParams, TrainViews
from featcache.runs import load_head_record, open_study, run_dir_for, study_rows
from featcache.tune import REFERENCE, STANDARDIZED_REFERENCE, _fit, load_head_data, rank_trial, suggest_params

REFERENCES = [REFERENCE.to_dict(), STANDARDIZED_REFERENCE.to_dict()]
TRIALS = 6
SEEDS = (0, 1000)  # one per worker; trial n of a worker is seeded with its seed + n


def _open(path, storage=None, seed=0):
    config = TrainHeadConfig(cache_dir=path.parent, storage=storage, seed=seed)
    return open_study(config, path, read_manifest(path)["fingerprint"], run_dir_for(path), REFERENCES)


def test_references_follow_trial_numbers_whichever_worker_asks_first(synthetic_cache):
    path = synthetic_cache()
    # Both workers open the new study before either has run a trial, the window in which two workers
    # that enqueue the references when they find the study empty would both enqueue them.
    first, second = _open(path, seed=0), _open(path, seed=1)
    assert not first.get_trials(deepcopy=False)  # nothing is enqueued
    trials = [study.ask() for study in (second, first, first, second)]  # the later opener asks first
    params = [suggest_params(trial).to_dict() for trial in trials]
    assert [trial.number for trial in trials] == [0, 1, 2, 3]
    assert params[:2] == REFERENCES
    assert not any(p in REFERENCES for p in params[2:]) and params[2] != params[3]


def test_a_worker_that_saves_last_keeps_a_better_head_of_the_study(synthetic_cache):
    """A worker that finished first may save after one that saw more trials; the better head stays."""
    from featcache.runs import write_head
    from featcache.tune import _better_saved, train_heads

    path = synthetic_cache(separation=0.7)
    (summary,) = train_heads(TrainHeadConfig(cache_dir=path.parent, trials=4, max_epochs=8, patience=3, progress=False))
    saved = load_head_record(path)
    study = _open(path)
    worse = max((row for row in study_rows(study) if not row["pruned"]), key=rank_trial)
    assert rank_trial(worse) > rank_trial(summary.best)
    stale = dict(cache_path=path, manifest=read_manifest(path), best=worse, threshold=0.5, val_metrics={}, probe={},
                 study_name=study.study_name)
    kept = write_head(run_dir_for(path), None, method="youden",
                      keep=_better_saved(study, worse, "youden", {}), **stale)  # head=None: it must not be saved
    assert kept["trial_number"] == summary.best["number"] and load_head_record(path) == saved
    # Another threshold rule is a new choice, not a worse one: it replaces the head.
    train_heads(TrainHeadConfig(cache_dir=path.parent, trials=4, max_epochs=8, patience=3, progress=False,
                                min_sensitivity=0.98))
    assert load_head_record(path)["threshold_method"] == "min_sensitivity=0.98"


OPEN_STUDY = """
import sys
from pathlib import Path
from featcache.config import TrainHeadConfig
from featcache.runs import open_study
config = TrainHeadConfig(storage=sys.argv[1])
open_study(config, Path("tiny-0123456789ab.h5"), "f" * 64, Path("."), [{"units": 128}])
"""


def test_workers_that_set_up_a_new_database_together_all_open_the_study(postgres_url):
    """Optuna creates its tables when it first opens a database; workers that all start on an empty one must
    not fail on each other's tables."""
    workers = [subprocess.Popen([sys.executable, "-c", OPEN_STUDY, postgres_url], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    outputs = [worker.communicate()[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * 4, outputs
    import optuna

    assert optuna.study.get_all_study_names(storage=postgres_url) == ["tiny-0123456789ab"]


def _start_worker(cache, seed, storage):
    args = [sys.executable, "-m", "featcache", "train-head", "--cache", str(cache), "--trials", str(TRIALS),
            "--seed", str(seed), "--no-progress", *(["--storage", storage] if storage else [])]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


@pytest.mark.parametrize("backend", ["journal", "postgresql"])
def test_two_workers_share_one_new_study(backend, synthetic_cache, request):
    import optuna
    import tensorflow as tf

    path = synthetic_cache(separation=0.7)  # not trivially separable, so trials differ
    storage = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    workers = [_start_worker(path, seed, storage) for seed in SEEDS]  # both start on a study that does not exist
    outputs = [worker.communicate()[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], [output[-2000:] for output in outputs]

    study = _open(path, storage)
    unfinished = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING, optuna.trial.TrialState.FAIL)
    assert not study.get_trials(deepcopy=False, states=unfinished)
    rows = study_rows(study)
    # Each worker stops once the study holds TRIALS finished trials; the other's trial in flight then finishes.
    assert TRIALS <= len(rows) <= TRIALS + len(SEEDS) - 1
    assert [row["number"] for row in rows] == list(range(len(rows)))
    params = [row["params"] for row in rows]
    assert params[:2] == REFERENCES and params.count(REFERENCES[0]) == params.count(REFERENCES[1]) == 1
    assert all(row["seed"] - row["number"] in SEEDS for row in rows)

    # Every finished (not pruned) trial gives its recorded scores again from its parameters and seed.
    data = load_head_data(path)
    train = TrainViews(tf.convert_to_tensor(data.train.pooled), data.train.labels, data.train.source_index)
    for row in (row for row in rows if not row["pruned"]):
        result, _, _ = _fit(HeadParams(**row["params"]), row["seed"], row["max_epochs"], row["patience"], data, train)
        assert result.scores["roc_auc"] == pytest.approx(row["val_roc_auc"], abs=1e-6), row["number"]
        assert result.scores["loss"] == pytest.approx(row["val_loss"], abs=1e-6), row["number"]

    best = min((row for row in rows if not row["pruned"]), key=rank_trial)
    record = load_head_record(path)
    assert (record["trial_number"], record["params"], record["seed"]) == (best["number"], best["params"], best["seed"])


@pytest.mark.parametrize("raw_collapsed, held", [(True, True), (False, False)])
def test_standardization_is_held_on_only_after_the_raw_reference_collapsed(synthetic_cache, raw_collapsed, held):
    """When the reference head collapses and its standardized twin does not, later trials keep standardize on;
    when the raw reference learns, the search keeps proposing both values."""
    from featcache.tune import settle_standardize

    path = synthetic_cache()
    config = TrainHeadConfig(cache_dir=path.parent, seed=0)
    study = open_study(config, path, read_manifest(path)["fingerprint"], run_dir_for(path), REFERENCES,
                       settle=settle_standardize)

    def objective(trial):  # stands in for a head fit: only the collapsed flag of the references matters
        suggest_params(trial)
        trial.set_user_attr("collapsed", raw_collapsed and trial.number == 0)
        return 0.5 if trial.number == 0 else 0.9

    study.optimize(objective, n_trials=14)
    later = [trial.params["standardize"] for trial in study.trials[2:]]
    assert [trial.params["standardize"] for trial in study.trials[:2]] == [False, True]
    assert all(later) if held else set(later) == {False, True}


def test_a_stale_reference_trial_is_failed_and_run_again_once_and_the_next_reference_keeps_its_turn(
        synthetic_cache, monkeypatch):
    """A worker killed in the reference trial leaves it RUNNING; the next worker to open the study (after the
    grace period) marks it FAIL and queues its parameters again; the retry takes a trial number, and the second
    reference still runs, each reference finishing exactly once, and ``settle`` sees both."""
    import optuna

    from featcache import runs
    from featcache.tune import settle_standardize

    path = synthetic_cache()
    killed = _open(path).ask()  # trial 0, the reference; its worker dies before telling
    assert suggest_params(killed).to_dict() == REFERENCES[0]
    study = _open(path)  # within the grace period: still running, neither done nor failed
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.RUNNING]
    monkeypatch.setattr(runs, "GRACE_SECONDS", 0)
    config = TrainHeadConfig(cache_dir=path.parent, seed=0)
    study = open_study(config, path, read_manifest(path)["fingerprint"], run_dir_for(path), REFERENCES,
                       settle=settle_standardize)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
    assert study.trials[1].system_attrs["failed_trial"] == 0

    def objective(trial):  # the raw reference collapses, the standardized one learns: standardize is held on
        params = suggest_params(trial).to_dict()
        trial.set_user_attr("collapsed", params == REFERENCES[0])
        return 0.5 if params == REFERENCES[0] else 0.9

    study.optimize(objective, n_trials=8)
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    params = [{key: t.params[key] for key in REFERENCES[0]} for t in finished]
    assert len(finished) == 8 and params[:2] == REFERENCES
    assert params.count(REFERENCES[0]) == params.count(REFERENCES[1]) == 1
    assert all(t.params["standardize"] for t in finished[2:])  # settle saw both references


def _reader(cache, storage):
    """An Optuna storage that reads the study as it is now, at every call (one connection pool for all)."""
    import optuna
    import sqlalchemy
    from optuna.storages.journal import JournalFileBackend

    if storage is None:
        run_dir_for(cache).mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(run_dir_for(cache) / "study.journal")))
    from featcache.runs import _schema_lock

    with _schema_lock(storage):  # as the workers do: one of them may be creating the tables
        return optuna.storages.RDBStorage(storage, engine_kwargs={"poolclass": sqlalchemy.pool.NullPool})


def _trials(cache, reader):
    import optuna

    return optuna.load_study(study_name=cache.stem, storage=reader).get_trials(deepcopy=False)


@pytest.mark.parametrize("backend", ["journal", "postgresql"])
def test_a_worker_killed_mid_trial_neither_counts_nor_blocks_and_its_trial_is_run_again(
        backend, synthetic_cache, request, monkeypatch):
    """SIGKILL a train-head worker in the middle of the reference trial: a rerun marks that trial FAIL once its
    heartbeat is stale, runs it again, and the finished trials add up to the requested count."""
    import signal
    import time

    import optuna

    from featcache import runs
    from featcache.tune import train_heads

    path = synthetic_cache(n_train=1500, n_val=300, separation=0.7)  # a trial long enough to be killed in
    storage = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    worker = _start_worker(path, 0, storage)
    reader = _reader(path, storage)
    deadline, running = time.monotonic() + 600, optuna.trial.TrialState.RUNNING
    while not any(t.number == 0 and t.state == running and set(REFERENCES[0]) <= set(t.params)  # fitting
                  for t in _safe_trials(path, reader)):
        assert worker.poll() is None and time.monotonic() < deadline, worker.communicate()[0][-2000:]
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.communicate()
    (stale,) = [t for t in _trials(path, reader) if t.state == running]
    assert stale.number == 0  # killed in the reference trial

    monkeypatch.setattr(runs, "GRACE_SECONDS", 1)  # the rerun comes after the grace period (RDB: whole seconds)
    time.sleep(2)
    trials = 4
    train_heads(TrainHeadConfig(cache_dir=path.parent, storage=storage, trials=trials, progress=False))
    every = _trials(path, reader)
    assert every[0].state == optuna.trial.TrialState.FAIL
    assert not [t for t in every if t.state in (running, optuna.trial.TrialState.WAITING)]
    rows = study_rows(_open(path, storage))
    params = [row["params"] for row in rows]
    assert len(rows) == trials and params.count(REFERENCES[0]) == params.count(REFERENCES[1]) == 1
    (retry,) = [t for t in every if t.system_attrs.get("failed_trial") == 0]
    assert retry.number in [row["number"] for row in rows] and retry.params == stale.params
    assert load_head_record(path)["trial_number"] in [row["number"] for row in rows]


def _safe_trials(cache, reader):
    """The study's trials, or none while the worker has not created the study yet."""
    try:
        return _trials(cache, reader)
    except (KeyError, ValueError, FileNotFoundError):
        return []
