"""Calibration metrics against scikit-learn and a direct per-bin computation; the bootstrap, resample by resample."""

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss

from featcache.calibration import (
    bin_index,
    calibration,
    calibration_samples,
    calibration_with_intervals,
    reliability_bins,
)
from featcache.errors import FeatcacheError
from featcache.metrics import bootstrap_indices


def _ece_by_loop(labels, probs, n_bins=10):
    total = 0.0
    for i in range(n_bins):
        low, high = i / n_bins, (i + 1) / n_bins
        inside = (probs >= low) & ((probs < high) if i < n_bins - 1 else (probs <= high))
        if inside.any():
            total += inside.mean() * abs(labels[inside].mean() - probs[inside].mean())
    return total


def _random_set(seed=0, n=300):
    rng = np.random.default_rng(seed)
    probs = rng.uniform(size=n)
    return (rng.uniform(size=n) < probs ** 2).astype(int), probs  # miscalibrated: P(y=1 | p) = p^2


def test_point_estimates_against_sklearn_and_a_loop():
    labels, probs = _random_set()
    probs[:3] = [0.0, 1.0, 0.5]  # the edges: 1.0 belongs to the last bin
    point = calibration(labels, probs)
    assert point["brier"] == pytest.approx(brier_score_loss(labels, probs), abs=1e-12)
    assert point["ece"] == pytest.approx(_ece_by_loop(labels, probs), abs=1e-12)
    assert bin_index(np.array([0.0, 0.0999, 0.1, 0.95, 1.0])).tolist() == [0, 0, 1, 9, 9]


def test_ece_tells_calibrated_from_overconfident():
    rng = np.random.default_rng(1)
    probs = rng.uniform(size=20_000)
    calibrated = (rng.uniform(size=probs.size) < probs).astype(int)
    assert calibration(calibrated, probs)["ece"] < 0.02
    overconfident = np.where(probs > 0.5, 0.999, 0.001)  # the same labels, pushed to the extremes
    assert calibration(calibrated, overconfident)["ece"] > 0.2


def test_bootstrap_samples_equal_each_resample_computed_alone():
    labels, probs = _random_set(2, 80)
    indices = bootstrap_indices(len(labels), 25, seed=3)
    samples = calibration_samples(labels, probs, indices)
    for row, rows in enumerate(indices):
        alone = calibration(labels[rows], probs[rows])
        assert samples["brier"][row] == pytest.approx(alone["brier"], abs=1e-12)
        assert samples["ece"][row] == pytest.approx(alone["ece"], abs=1e-12)


def test_intervals_hold_the_estimate_and_do_not_depend_on_the_block_size():
    labels, probs = _random_set(4)
    whole = calibration_with_intervals(labels, probs, n_bootstrap=200, seed=5)
    blocked = calibration_with_intervals(labels, probs, n_bootstrap=200, seed=5, block=7)
    assert whole["metrics"] == blocked["metrics"]
    for entry in whole["metrics"].values():
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"] and entry["ci_low"] < entry["ci_high"]
    bins = whole["bins"]
    assert len(bins) == 10 and sum(b["count"] for b in bins) == len(labels)
    assert bins == reliability_bins(labels, probs)
    high = bins[-1]  # P(y=1 | p) = p^2: the top bin is less positive than it says
    assert high["mean_prob"] == pytest.approx(probs[probs >= 0.9].mean())
    assert high["fraction_positive"] == pytest.approx(labels[probs >= 0.9].mean())


def test_empty_bins_and_bad_input():
    bins = reliability_bins(np.array([0, 1]), np.array([0.05, 0.95]))
    assert bins[5]["count"] == 0 and np.isnan(bins[5]["mean_prob"])
    with pytest.raises(FeatcacheError, match="n_bootstrap"):
        calibration_with_intervals(np.array([0, 1]), np.array([0.1, 0.9]), n_bootstrap=0)
    with pytest.raises(FeatcacheError, match="labels must be 0 or 1"):
        calibration(np.array([0, 2]), np.array([0.1, 0.9]))


def test_reliability_bins_and_ece_against_sklearn_calibration_curve():
    from sklearn.calibration import calibration_curve

    labels, probs = _random_set(seed=3, n=2000)
    probs[:2] = [0.0, 1.0]  # no value on an inner edge: there sklearn puts it in the lower bin, this module in the upper
    prob_true, prob_pred = calibration_curve(labels, probs, n_bins=10, strategy="uniform")
    full = [b for b in reliability_bins(labels, probs) if b["count"]]
    np.testing.assert_allclose([b["fraction_positive"] for b in full], prob_true, atol=1e-12)
    np.testing.assert_allclose([b["mean_prob"] for b in full], prob_pred, atol=1e-12)
    counts = np.array([b["count"] for b in full])
    expected_ece = float(np.sum(counts / len(labels) * np.abs(prob_true - prob_pred)))
    assert calibration(labels, probs)["ece"] == pytest.approx(expected_ece, abs=1e-12)
    assert calibration(labels, probs)["brier"] == pytest.approx(brier_score_loss(labels, probs), abs=1e-12)
