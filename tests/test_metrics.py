"""Metrics against scikit-learn and hand counts on known arrays; bootstrap resamples; the baseline."""

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from featcache.errors import FeatcacheError
from featcache.metrics import (
    METRICS,
    binary_metrics,
    bootstrap_index_blocks,
    bootstrap_indices,
    bootstrap_samples,
    confusion,
    majority_baseline,
    score_with_intervals,
)

LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
PROBS = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.6, 0.55, 0.3, 0.7, 0.5])


def test_point_metrics_by_hand_and_against_sklearn():
    m = binary_metrics(LABELS, PROBS, threshold=0.5)  # positive when prob >= 0.5
    # predicted: 0 0 0 1 | 1 1 1 0 1 1 -> tn 3, fp 1, fn 1, tp 5
    assert confusion(LABELS, PROBS, 0.5) == {"tn": 3, "fp": 1, "fn": 1, "tp": 5, "matrix": [[3, 1], [1, 5]]}
    assert m["accuracy"] == pytest.approx(8 / 10)
    assert m["sensitivity"] == pytest.approx(5 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(5 / 6)
    assert m["f1"] == pytest.approx(2 * 5 / (2 * 5 + 1 + 1))
    predicted = (PROBS >= 0.5).astype(int)
    assert m["accuracy"] == accuracy_score(LABELS, predicted)
    assert m["sensitivity"] == recall_score(LABELS, predicted)
    assert m["specificity"] == recall_score(1 - LABELS, 1 - predicted)
    assert m["precision"] == precision_score(LABELS, predicted)
    assert m["f1"] == f1_score(LABELS, predicted)
    assert m["roc_auc"] == roc_auc_score(LABELS, PROBS)
    assert m["pr_auc"] == average_precision_score(LABELS, PROBS)
    # ROC-AUC by pair counting: 17 of the 24 (positive, negative) pairs are ordered right
    assert m["roc_auc"] == pytest.approx(17 / 24)


def test_threshold_moves_the_calls_not_the_ranking():
    low, high = binary_metrics(LABELS, PROBS, 0.2), binary_metrics(LABELS, PROBS, 0.85)
    assert low["sensitivity"] == 1.0 and high["specificity"] == 1.0
    assert low["roc_auc"] == high["roc_auc"] and low["pr_auc"] == high["pr_auc"]


def test_bootstrap_resamples_match_sklearn_one_by_one():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 23)
    probs = np.round(rng.random(23), 1)  # many ties
    indices = bootstrap_indices(len(labels), 60, seed=5)
    samples = bootstrap_samples(labels, probs, 0.45, indices)
    for i, rows in enumerate(indices):
        expected = binary_metrics(labels[rows], probs[rows], 0.45)
        for name in METRICS:
            if np.isnan(expected[name]):
                assert np.isnan(samples[name][i]), name
            else:
                assert samples[name][i] == pytest.approx(expected[name], abs=1e-12), (name, i)


def test_intervals_bracket_the_estimate_and_are_reproducible():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(labels * 0.3 + rng.random(200) * 0.7, 0, 1)
    a = score_with_intervals(labels, probs, 0.5, n_bootstrap=300, seed=3)
    b = score_with_intervals(labels, probs, 0.5, n_bootstrap=300, seed=3)
    assert a == b
    for name in METRICS:
        m = a["metrics"][name]
        assert m["ci_low"] <= m["value"] <= m["ci_high"], name
        assert m["ci_high"] - m["ci_low"] < 0.25, name
    assert a["confusion"]["tp"] + a["confusion"]["fn"] == labels.sum()
    assert a["bootstrap"] == {"resamples": 300, "level": 0.95, "seed": 3, "method": "percentile"}


@pytest.mark.parametrize("n, block", [(1, 3), (23, 1), (23, 7), (150, 64), (501, 1000), (5000, None)])
def test_index_blocks_are_the_whole_index_array_bit_for_bit(n, block):
    blocks = list(bootstrap_index_blocks(n, 300, seed=7, block=block))
    assert all(len(b) <= (block or 300) for b in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks), bootstrap_indices(n, 300, seed=7))


def test_intervals_do_not_depend_on_the_block_size():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 97)
    probs = np.round(rng.random(97), 2)  # ties
    # What the intervals were before blocks: every resample at once.
    whole = bootstrap_samples(labels, probs, 0.5, bootstrap_indices(97, 250, seed=4))
    tail = 100 * (1 - 0.95) / 2  # as score_with_intervals computes it (not exactly 2.5)
    expected = {name: np.percentile(whole[name][np.isfinite(whole[name])], [tail, 100 - tail]).tolist()
                for name in METRICS}
    for block in (1, 7, 100, 250, 10_000, None):
        scored = score_with_intervals(labels, probs, 0.5, n_bootstrap=250, seed=4, block=block)
        found = {name: [m["ci_low"], m["ci_high"]] for name, m in scored["metrics"].items()}
        assert found == expected, block


def test_one_class_gives_nan_ranking_metrics():
    m = binary_metrics(np.ones(4), np.array([0.2, 0.6, 0.7, 0.9]))
    assert np.isnan(m["roc_auc"]) and np.isnan(m["specificity"]) and m["sensitivity"] == 0.75


def test_majority_baseline_comes_from_train_labels():
    train = np.array([1, 1, 1, 0])
    test = np.array([0, 0, 0, 1])  # test's own majority is 0; the baseline must not know that
    base = majority_baseline(train, test)
    assert base["class_index"] == 1
    assert base["metrics"]["accuracy"] == 0.25 and base["metrics"]["sensitivity"] == 1.0
    assert base["metrics"]["roc_auc"] == 0.5


@pytest.mark.parametrize("labels, probs, match", [
    ([0, 1], [0.5], "same, non-zero length"),
    ([], [], "same, non-zero length"),
    ([0, 2], [0.1, 0.2], "must be 0 or 1"),
])
def test_bad_arrays(labels, probs, match):
    with pytest.raises(FeatcacheError, match=match):
        binary_metrics(labels, probs)


def test_bad_bootstrap_settings():
    with pytest.raises(FeatcacheError, match="Received: n_bootstrap=0"):
        score_with_intervals(LABELS, PROBS, 0.5, n_bootstrap=0)
