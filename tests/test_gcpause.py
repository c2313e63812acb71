"""The cyclic collector is paused for extract's bookkeeping, runs while rows are computed, and comes back."""

import gc

import pytest

import featcache.extract as extract
from featcache.extract import extract_features
from featcache.gcpause import paused_gc, running_gc


def test_the_collectors_state_is_restored_even_on_errors():
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with paused_gc():
            assert not gc.isenabled()
            with running_gc():
                assert gc.isenabled()
            assert not gc.isenabled()
            raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled(), "a caller's own pause is kept"
        with running_gc():
            assert gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_extract_pauses_it_for_the_scan_and_runs_it_while_computing(small_xrays, extract_config, monkeypatch):
    seen = {}
    hash_files, compute = extract._hash_files, extract.compute_batches

    def hashing(*args, **kwargs):
        seen["hashing"] = gc.isenabled()
        return hash_files(*args, **kwargs)

    def computing(*args, **kwargs):
        seen["computing"] = gc.isenabled()
        return compute(*args, **kwargs)

    monkeypatch.setattr(extract, "_hash_files", hashing)
    monkeypatch.setattr(extract, "compute_batches", computing)
    (summary,) = extract_features(extract_config(small_xrays, augment_copies=0))
    assert summary.computed_rows > 0 and seen == {"hashing": False, "computing": True} and gc.isenabled()
