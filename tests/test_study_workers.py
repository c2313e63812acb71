"""Several ``train-head`` workers on one study: each reference trial runs once whoever asks first, the trials
add up to the requested count, every trial reproduces from its recorded parameters and seed, and the saved
head is the study's best; on the default journal file and on a real PostgreSQL server."""

from featcache.cache import read_manifest
from featcache.config import TrainHeadConfig
from featcache.runs import open_study, run_dir_for
from featcache.tune import REFERENCE, STANDARDIZED_REFERENCE, suggest_params

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
