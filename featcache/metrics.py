"""Test-set metrics of a binary classifier: point estimates (scikit-learn), 95 % bootstrap confidence
intervals, the confusion matrix and the majority-class baseline. Pure computation, no file IO.

The positive class is label 1 (PNEUMONIA); an image is called positive when ``prob >= threshold``,
the convention of ``head.choose_threshold``.
"""

from __future__ import annotations

import numpy as np

from featcache.errors import FeatcacheError

METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "pr_auc")
THRESHOLD_METRICS = METRICS[:5]  # depend on the threshold; roc_auc and pr_auc do not
N_BOOTSTRAP = 1000
LEVEL = 0.95
# Resamples x images per bootstrap block: each (block, n) array is at most 4 MiB of int64/float64, whatever
# the size of the test set (1,000 resamples of 5,000 images at once held about 40 MB per array, ~10 arrays).
BLOCK_ELEMENTS = 2**19


def check_binary(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    """(n,) int64 0/1 labels and (n,) float64 probabilities, or a one-line error."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()
    if labels.shape != probs.shape or not len(labels):
        raise FeatcacheError(f"labels and probs need the same, non-zero length. Received: labels={labels.shape}, "
                             f"probs={probs.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise FeatcacheError(f"labels must be 0 or 1. Received: labels={np.unique(labels).tolist()}")
    return labels, probs


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict:
    """Point estimates with scikit-learn.

    Args:
        labels: (n,) 0/1, 1 = the positive class.
        probs: (n,) predicted probability of the positive class.
        threshold: positive when ``prob >= threshold``.

    Returns:
        ``{metric: value}`` for every name in ``METRICS``; sensitivity is the recall of class 1,
        specificity the recall of class 0, pr_auc the average precision. A metric undefined on these
        labels (e.g. ROC-AUC with one class) is NaN; precision with no positive call is 0.
    """
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    labels, probs = check_binary(labels, probs)
    predicted = (probs >= threshold).astype(np.int64)
    both = len(np.unique(labels)) == 2
    nan = float("nan")
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "sensitivity": float(recall_score(labels, predicted, pos_label=1, zero_division=np.nan)),
        "specificity": float(recall_score(labels, predicted, pos_label=0, zero_division=np.nan)),
        "precision": float(precision_score(labels, predicted, zero_division=0)),
        "f1": float(f1_score(labels, predicted, zero_division=0)),
        "roc_auc": float(roc_auc_score(labels, probs)) if both else nan,
        "pr_auc": float(average_precision_score(labels, probs)) if both else nan,
    }


def confusion(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict:
    """Confusion counts ``{"tn", "fp", "fn", "tp"}`` and the 2x2 ``matrix`` (rows true 0/1, columns predicted)."""
    from sklearn.metrics import confusion_matrix

    labels, probs = check_binary(labels, probs)
    matrix = confusion_matrix(labels, (probs >= threshold).astype(np.int64), labels=[0, 1])
    tn, fp, fn, tp = (int(v) for v in matrix.ravel())
    return {"tn": tn, "fp": fp, "fn": fn, "tp": tp, "matrix": matrix.tolist()}


def bootstrap_indices(n: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """(n_bootstrap, n) row indices drawn with replacement; the same seed gives the same resamples."""
    return np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))


def bootstrap_index_blocks(n: int, n_bootstrap: int, seed: int, block: int | None = None):
    """The rows of ``bootstrap_indices(n, n_bootstrap, seed)`` in blocks of ``block`` resamples.

    The blocks are drawn one after the other from the same generator, so stacked they are that array bit
    for bit (a test checks it); only one block is in memory at a time.

    Yields:
        (b, n) row indices, b <= ``block`` (default: as many resamples as fit in ``BLOCK_ELEMENTS``).
    """
    block = block if block is not None else max(1, BLOCK_ELEMENTS // max(1, n))
    rng = np.random.default_rng(seed)
    for start in range(0, n_bootstrap, block):
        yield rng.integers(0, n, size=(min(block, n_bootstrap - start), n))


def bootstrap_samples(labels: np.ndarray, probs: np.ndarray, threshold: float, indices: np.ndarray) -> dict:
    """Each metric on each resample: ``{metric: (n_bootstrap,) float64}``, NaN where undefined.

    Vectorised over the resamples, with the definitions of ``binary_metrics`` (scikit-learn's;
    the tests compare them resample by resample): confusion counts for the threshold metrics,
    the rank statistic for ROC-AUC (ties count one half) and step-wise average precision for PR-AUC.
    """
    labels, probs = check_binary(labels, probs)
    y = labels[indices].astype(bool)
    scores = probs[indices]
    called = scores >= threshold
    tp, fp = (y & called).sum(1), (~y & called).sum(1)
    fn, tn = (y & ~called).sum(1), (~y & ~called).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "accuracy": (tp + tn) / indices.shape[1],
            "sensitivity": np.where(tp + fn > 0, tp / (tp + fn), np.nan),
            "specificity": np.where(tn + fp > 0, tn / (tn + fp), np.nan),
            "precision": np.where(tp + fp > 0, tp / (tp + fp), 0.0),
            "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0),
        }
    return {**out, **_ranking_samples(y, scores)}


def _ranking_samples(y: np.ndarray, scores: np.ndarray) -> dict:
    """ROC-AUC and average precision of each row of (B, n) labels and scores; NaN for a one-class row."""
    from scipy.stats import rankdata

    n_pos = y.sum(1)
    n_neg = y.shape[1] - n_pos
    both = (n_pos > 0) & (n_neg > 0)
    ranks = rankdata(scores, axis=1, method="average")  # Mann-Whitney U: ties count one half
    with np.errstate(invalid="ignore", divide="ignore"):
        roc = ((ranks * y).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        # AP = sum over thresholds of (recall step) * precision; each positive adds the precision at the
        # end of its group of tied scores (sklearn's precision_recall_curve treats a tie as one threshold).
        order = np.argsort(-scores, axis=1, kind="stable")
        sorted_scores = np.take_along_axis(scores, order, 1)
        sorted_y = np.take_along_axis(y, order, 1)
        tp = np.cumsum(sorted_y, 1)
        precision = tp / np.arange(1, y.shape[1] + 1)
        is_end = np.ones_like(sorted_y)
        is_end[:, :-1] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
        positions = np.where(is_end, np.arange(y.shape[1]), y.shape[1] - 1)
        group_end = np.minimum.accumulate(positions[:, ::-1], axis=1)[:, ::-1]
        ap = (np.take_along_axis(precision, group_end, 1) * sorted_y).sum(1) / n_pos
    return {"roc_auc": np.where(both, roc, np.nan), "pr_auc": np.where(both, ap, np.nan)}


def score_with_intervals(labels: np.ndarray, probs: np.ndarray, threshold: float, *,
                         n_bootstrap: int = N_BOOTSTRAP, seed: int = 0, level: float = LEVEL,
                         block: int | None = None) -> dict:
    """Metrics with percentile bootstrap confidence intervals, plus the confusion matrix.

    Args:
        labels: (n,) 0/1 test labels.
        probs: (n,) probabilities of class 1.
        threshold: decision threshold.
        n_bootstrap: resamples of the n test images (with replacement).
        seed: seed of the resamples (the same for every threshold and backbone, so intervals pair up).
        level: confidence level of the two-sided interval.
        block: resamples computed at a time (``bootstrap_index_blocks``); the result does not depend on it.

    Returns:
        ``{"threshold", "metrics": {name: {"value", "ci_low", "ci_high"}}, "confusion", "bootstrap"}``.
    """
    if n_bootstrap < 1 or not 0 < level < 1:
        raise FeatcacheError(f"Need n_bootstrap >= 1 and 0 < level < 1. Received: n_bootstrap={n_bootstrap}, "
                             f"level={level}")
    point = binary_metrics(labels, probs, threshold)
    blocks = [bootstrap_samples(labels, probs, threshold, indices)
              for indices in bootstrap_index_blocks(len(labels), n_bootstrap, seed, block)]
    return {
        "threshold": float(threshold),
        "metrics": {name: percentile_interval(point[name], np.concatenate([b[name] for b in blocks]), level)
                    for name in METRICS},
        "confusion": confusion(labels, probs, threshold),
        "bootstrap": {"resamples": n_bootstrap, "level": level, "seed": seed, "method": "percentile"},
    }


def percentile_interval(point: float, samples: np.ndarray, level: float) -> dict:
    """``{"value", "ci_low", "ci_high"}``: ``point`` and the two-sided percentile interval at ``level`` of the
    finite ``samples`` (resamples lacking a class give NaN and are left out); NaN bounds when none is finite."""
    finite = samples[np.isfinite(samples)]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail]) if len(finite) else (np.nan, np.nan)
    return {"value": float(point), "ci_low": float(low), "ci_high": float(high)}


def majority_baseline(train_labels: np.ndarray, test_labels: np.ndarray) -> dict:
    """The classifier that always answers the training split's majority class, scored on test.

    The class comes from the training labels, never from test. ROC-AUC of a constant score is 0.5.
    """
    train_labels = np.asarray(train_labels).astype(np.int64)
    test_labels = np.asarray(test_labels).astype(np.int64)
    majority = int(np.bincount(train_labels, minlength=2).argmax())
    constant = np.full(len(test_labels), float(majority))
    scores = binary_metrics(test_labels, constant, threshold=0.5)
    return {"class_index": majority, "metrics": scores, "confusion": confusion(test_labels, constant, 0.5)}
