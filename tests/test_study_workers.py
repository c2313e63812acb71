"""Several ``train-head`` workers on one study: each reference trial runs once whoever asks first, the trials
add up to the requested count, every trial reproduces from its recorded parameters and seed, and the saved
head is the study's best; on the default journal file and on a real PostgreSQL server."""

from featcache.cache import read_manifest
from featcache.config import TrainHeadConfig
from featcache.runs import load_head_record, open_study, run_dir_for, study_rows
from featcache.tune import REFERENCE, STANDARDIZED_REFERENCE, rank_trial, suggest_params

REFERENCES = [REFERENCE.to_dict(), STANDARDIZED_REFERENCE.to_dict()]


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
