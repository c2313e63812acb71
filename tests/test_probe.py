"""The linear probe: the C grid chosen on validation, determinism, and its floor on separable data."""

import numpy as np
import pytest

from featcache.probe import C_GRID, Probe, fit_probe


def _data(seed: int = 0, n: int = 300, c: int = 12, separation: float = 1.5):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.7).astype(np.int64)
    labels[:2] = (0, 1)
    pooled = (np.outer(labels - 0.5, separation * rng.normal(size=c)) + rng.normal(size=(n, c)))
    pooled = (1e3 * np.arange(1, c + 1) + 1e-2 * pooled).astype(np.float32)  # badly scaled on purpose
    return pooled, labels


def test_probe_learns_badly_scaled_features_and_records_the_grid():
    pooled, labels = _data()
    probe = fit_probe(pooled[:200], labels[:200], pooled[200:], labels[200:])
    assert probe.val_scores["roc_auc"] >= 0.9
    assert set(probe.val_scores["grid"]) == {f"{c:g}" for c in C_GRID}
    assert probe.c in C_GRID and probe.val_scores["grid"][f"{probe.c:g}"] == max(probe.val_scores["grid"].values())
    # predict() is StandardScaler + LogisticRegression, as scikit-learn computes it
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    reference = make_pipeline(StandardScaler(), LogisticRegression(C=probe.c, max_iter=500))
    reference.fit(pooled[:200].astype(np.float64), labels[:200])
    np.testing.assert_allclose(probe.predict(pooled[200:]), reference.predict_proba(pooled[200:].astype(np.float64))[:, 1],
                               atol=1e-4)


def test_probe_is_deterministic_and_round_trips_through_json():
    import json

    pooled, labels = _data(seed=1)
    first = fit_probe(pooled[:200], labels[:200], pooled[200:], labels[200:])
    second = fit_probe(pooled[:200], labels[:200], pooled[200:], labels[200:])
    assert first.c == second.c and first.val_scores == second.val_scores
    np.testing.assert_array_equal(first.coef, second.coef)
    loaded = Probe.from_dict(json.loads(json.dumps(first.to_dict())))
    np.testing.assert_array_equal(loaded.predict(pooled), first.predict(pooled))


def test_probe_on_noise_is_near_chance():
    """The floor is honest: features without signal give a validation ROC-AUC near 0.5, not a flattering one."""
    rng = np.random.default_rng(2)
    pooled, labels = rng.normal(size=(600, 8)).astype(np.float32), (rng.random(600) < 0.5).astype(np.int64)
    probe = fit_probe(pooled[:400], labels[:400], pooled[400:], labels[400:])
    assert probe.val_scores["roc_auc"] == pytest.approx(0.5, abs=0.12)


def test_a_rows_probability_does_not_depend_on_the_rows_beside_it():
    pooled, labels = _data(seed=2, n=400, c=512)
    probe = fit_probe(pooled[:300], labels[:300], pooled[300:], labels[300:])
    whole = probe.predict(pooled)
    for block in (1, 7, 64):  # evaluate scores the test images a batch at a time
        parts = np.concatenate([probe.predict(pooled[s:s + block]) for s in range(0, len(pooled), block)])
        np.testing.assert_array_equal(parts, whole)
    np.testing.assert_array_equal(probe.predict(pooled[::3]), whole[::3])
