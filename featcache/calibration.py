"""Calibration of a binary classifier's probabilities: Brier score, expected calibration error (ECE), the
reliability diagram's bins, with percentile bootstrap intervals. Pure computation, no file IO.

Definitions (the usual ones, e.g. Guo et al. 2017, "On Calibration of Modern Neural Networks"):

- Brier score: mean of ``(prob - label) ** 2`` over the images (scikit-learn's ``brier_score_loss``).
- ECE: the images are put in ``N_BINS`` equal-width bins of their probability of class 1 (bin ``i`` holds
  ``i/N <= prob < (i+1)/N``; the last bin also holds 1.0); ECE is the sum over bins of
  ``(images in bin / images) * |fraction of positives in bin - mean probability in bin|``. This is the
  binary ECE of the probability of the positive class, not the top-label ECE of a multi-class model.

The bootstrap draws the same resamples as ``metrics.score_with_intervals`` for the same ``seed`` and count, so
calibration and discrimination intervals of a report describe the same resampled test sets.
"""

from __future__ import annotations

import numpy as np

from featcache.errors import FeatcacheError
from featcache.metrics import LEVEL, N_BOOTSTRAP, bootstrap_index_blocks, check_binary

N_BINS = 10
CALIBRATION_METRICS = ("brier", "ece")


def bin_index(probs: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """The equal-width bin of each probability: ``floor(prob * n_bins)``, with 1.0 in the last bin."""
    return np.minimum((np.asarray(probs, dtype=np.float64) * n_bins).astype(np.int64), n_bins - 1)


def reliability_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> list[dict]:
    """One entry per bin: ``{"low", "high", "count", "mean_prob", "fraction_positive"}`` (NaN means when empty)."""
    labels, probs = check_binary(labels, probs)
    bins = bin_index(probs, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    sum_prob = np.bincount(bins, weights=probs, minlength=n_bins)
    sum_pos = np.bincount(bins, weights=labels, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob, fraction = sum_prob / count, sum_pos / count
    return [{"low": i / n_bins, "high": (i + 1) / n_bins, "count": int(count[i]),
             "mean_prob": float(mean_prob[i]), "fraction_positive": float(fraction[i])} for i in range(n_bins)]


def calibration_samples(labels: np.ndarray, probs: np.ndarray, indices: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Brier score and ECE of each resample: ``{"brier": (B,), "ece": (B,)}`` for (B, n) row ``indices``.

    Vectorised over the resamples: the per-bin sums of every resample come from one ``bincount`` over
    (resample, bin) pairs. ``sum_b (n_b / n) * |pos_b / n_b - prob_b / n_b| = sum_b |pos_b - prob_b| / n``.
    """
    labels, probs = check_binary(labels, probs)
    n_resamples, n = indices.shape
    squared = (probs - labels) ** 2
    pair = (np.arange(n_resamples)[:, None] * n_bins + bin_index(probs, n_bins)[indices]).ravel()
    size = n_resamples * n_bins
    sum_prob = np.bincount(pair, weights=probs[indices].ravel(), minlength=size).reshape(n_resamples, n_bins)
    sum_pos = np.bincount(pair, weights=labels[indices].ravel().astype(np.float64),
                          minlength=size).reshape(n_resamples, n_bins)
    return {"brier": squared[indices].mean(1), "ece": np.abs(sum_pos - sum_prob).sum(1) / n}


def calibration(labels: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Point estimates ``{"brier", "ece"}`` on the whole set."""
    labels, probs = check_binary(labels, probs)
    every = np.arange(len(labels))[None, :]
    return {name: float(value[0]) for name, value in calibration_samples(labels, probs, every, n_bins).items()}


def calibration_with_intervals(labels: np.ndarray, probs: np.ndarray, *, n_bootstrap: int = N_BOOTSTRAP,
                               seed: int = 0, level: float = LEVEL, n_bins: int = N_BINS,
                               block: int | None = None) -> dict:
    """Brier score and ECE with percentile bootstrap intervals, and the reliability diagram's bins.

    Returns:
        ``{"metrics": {"brier"|"ece": {"value", "ci_low", "ci_high"}}, "bins": reliability_bins(...),
        "n_bins", "bootstrap"}``.
    """
    check_interval_settings(n_bootstrap, level, n_bins)
    labels, probs = check_binary(labels, probs)
    point = calibration(labels, probs, n_bins)
    blocks = [calibration_samples(labels, probs, indices, n_bins)
              for indices in bootstrap_index_blocks(len(labels), n_bootstrap, seed, block)]
    return {"metrics": percentile_intervals(point, blocks, CALIBRATION_METRICS, level), "bins": reliability_bins(labels, probs, n_bins), "n_bins": n_bins,
            "bootstrap": {"resamples": n_bootstrap, "level": level, "seed": seed, "method": "percentile"}}


def check_interval_settings(n_bootstrap: int, level: float, n_bins: int) -> None:
    """Raises FeatcacheError unless n_bootstrap >= 1, 0 < level < 1 and n_bins >= 1."""
    if n_bootstrap < 1 or not 0 < level < 1 or n_bins < 1:
        raise FeatcacheError(f"Need n_bootstrap >= 1, 0 < level < 1 and n_bins >= 1. Received: "
                             f"n_bootstrap={n_bootstrap}, level={level}, n_bins={n_bins}")


def percentile_intervals(point: dict, blocks: list[dict], names, level: float) -> dict:
    """``{name: {"value", "ci_low", "ci_high"}}``: the point values and the percentile interval of each metric
    over the bootstrap samples in ``blocks`` (each a dict of per-resample arrays)."""
    tail = 100 * (1 - level) / 2
    metrics = {}
    for name in names:
        low, high = np.percentile(np.concatenate([b[name] for b in blocks]), [tail, 100 - tail])
        metrics[name] = {"value": point[name], "ci_low": float(low), "ci_high": float(high)}
    return metrics
