"""Calibration of a multi-class (softmax) head's probabilities: the top-label ECE, the multi-class Brier score and
the negative log-likelihood, with percentile bootstrap intervals; the reliability bins of the top-class
confidence; and the temperature of a softmax head. Pure computation, no file IO.

Definitions (Guo et al. 2017, "On Calibration of Modern Neural Networks"; Brier 1950):

- ECE (top-label): each image's confidence is its largest probability, ``max_k p_k``; the images are put in
  ``N_BINS`` equal-width bins of it (as ``calibration.bin_index``), and ECE is the sum over bins of
  ``(images in bin / images) * |accuracy in bin - mean confidence in bin|``, the accuracy being the share of
  images whose argmax is their class. It says whether "the model is 80 % sure" means right 80 % of the time.
- Brier score: mean over images of ``sum_k (p_k - [y = k]) ** 2`` (Brier's original multi-class score, from 0
  to 2; for two classes it is twice the binary ``calibration`` Brier score of the positive class).
- NLL: mean of ``-log p_y``, ``p_y`` clipped to [EPSILON, 1 - EPSILON] as ``multiclass.categorical_cross_entropy``.

The bootstrap draws the resamples of ``metrics.bootstrap_index_blocks`` (as the discrimination intervals of the
same report). Temperature scaling: one ``T > 0`` minimising the NLL of ``softmax(z / T)`` on validation logits;
dividing every logit by the same ``T`` keeps their order, so the argmax (the decision) is unchanged.
"""

from __future__ import annotations

import numpy as np

from featcache.calibration import N_BINS, bin_index, check_interval_settings, percentile_intervals
from featcache.errors import FeatcacheError
from featcache.head import EPSILON
from featcache.metrics import LEVEL, N_BOOTSTRAP, bootstrap_index_blocks

METRICS = ("brier", "ece", "nll")


def check_multiclass(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n,) int64 class indices and (n, k) float64 probabilities, k >= 2, each label in 0..k-1.

    Raises:
        FeatcacheError: shapes that do not match or a label outside 0..k-1.
    """
    labels, probs = np.asarray(labels).astype(np.int64), np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2 or labels.shape != (len(probs),):
        raise FeatcacheError(f"Multi-class calibration needs (n,) labels and (n, k) probabilities. Received: "
                             f"labels shape={labels.shape}, probs shape={probs.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise FeatcacheError(f"Labels must be class indices 0..{probs.shape[1] - 1}. "
                             f"Received: labels={np.unique(labels).tolist()[:5]}")
    return labels, probs


def confidence_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> list[dict]:
    """One entry per bin of the top-class confidence: ``{"low", "high", "count", "mean_confidence",
    "accuracy"}`` (NaN means when empty)."""
    labels, probs = check_multiclass(labels, probs)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    bins = bin_index(confidence, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(bins, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(bins, weights=correct.astype(np.float64), minlength=n_bins) / count
    return [{"low": i / n_bins, "high": (i + 1) / n_bins, "count": int(count[i]),
             "mean_confidence": float(mean[i]), "accuracy": float(accuracy[i])} for i in range(n_bins)]


def calibration_samples(labels: np.ndarray, probs: np.ndarray, indices: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Brier score, top-label ECE and NLL of each resample: ``{name: (B,)}`` for (B, n) row ``indices``.

    Vectorised as ``calibration.calibration_samples``: ECE is ``sum_b |correct_b - confidence_b| / n`` with the
    per-bin sums of every resample from one ``bincount`` over (resample, bin) pairs.
    """
    labels, probs = check_multiclass(labels, probs)
    n_resamples, n = indices.shape
    rows = np.arange(len(labels))
    onehot = np.zeros_like(probs)
    onehot[rows, labels] = 1.0
    brier = ((probs - onehot) ** 2).sum(axis=1)
    nll = -np.log(np.clip(probs[rows, labels], EPSILON, 1 - EPSILON))
    confidence, correct = probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(np.float64)
    pair = (np.arange(n_resamples)[:, None] * n_bins + bin_index(confidence, n_bins)[indices]).ravel()
    size = n_resamples * n_bins
    sum_conf = np.bincount(pair, weights=confidence[indices].ravel(), minlength=size).reshape(n_resamples, n_bins)
    sum_correct = np.bincount(pair, weights=correct[indices].ravel(), minlength=size).reshape(n_resamples, n_bins)
    return {"brier": brier[indices].mean(1), "ece": np.abs(sum_correct - sum_conf).sum(1) / n,
            "nll": nll[indices].mean(1)}


def calibration(labels: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Point estimates ``{"brier", "ece", "nll"}`` on the whole set."""
    every = np.arange(len(labels))[None, :]
    return {name: float(value[0]) for name, value in calibration_samples(labels, probs, every, n_bins).items()}


def calibration_with_intervals(labels: np.ndarray, probs: np.ndarray, *, n_bootstrap: int = N_BOOTSTRAP,
                               seed: int = 0, level: float = LEVEL, n_bins: int = N_BINS) -> dict:
    """Brier score, top-label ECE and NLL with percentile bootstrap intervals, and the reliability bins.

    Returns:
        ``{"metrics": {"brier"|"ece"|"nll": {"value", "ci_low", "ci_high"}}, "bins": confidence_bins(...),
        "n_bins", "of": "top-class confidence", "bootstrap"}``.
    """
    check_interval_settings(n_bootstrap, level, n_bins)
    labels, probs = check_multiclass(labels, probs)
    point = calibration(labels, probs, n_bins)
    blocks = [calibration_samples(labels, probs, indices, n_bins)
              for indices in bootstrap_index_blocks(len(labels), n_bootstrap, seed)]
    return {"metrics": percentile_intervals(point, blocks, METRICS, level), "bins": confidence_bins(labels, probs, n_bins), "n_bins": n_bins,
            "of": "top-class confidence", "bootstrap": {"resamples": n_bootstrap, "level": level, "seed": seed,
                                                         "method": "percentile"}}


def softmax_log_loss(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean NLL of ``softmax(logits)`` at the labels, from the logits (log-sum-exp: no clipping, no overflow)."""
    from scipy.special import logsumexp

    labels, logits = np.asarray(labels, np.int64), np.asarray(logits, np.float64)
    return float(np.mean(logsumexp(logits, axis=1) - logits[np.arange(len(labels)), labels]))


def fit_softmax_temperature(labels: np.ndarray, logits: np.ndarray) -> float:
    """The ``T > 0`` minimising the mean NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    The NLL is convex in ``1/T`` (a log-sum-exp of a linear function minus a linear one), so a bounded scalar
    search over ``log(1/T)`` finds its minimum.

    Args:
        labels: (m,) class indices.
        logits: (m, k) the head's pre-softmax outputs.

    Raises:
        FeatcacheError: fewer than two classes among the labels, or logits that score the true class below the
            average class (the minimum is at ``1/T <= 0``: no temperature helps).
    """
    from featcache.posthoc import search_temperature

    labels, logits = np.asarray(labels).astype(np.int64), np.asarray(logits, np.float64)
    present = np.unique(labels)
    if len(present) < 2:
        raise FeatcacheError(f"Calibration needs at least two classes among the validation images. "
                             f"Received: labels={present.tolist()}")
    # d NLL / d(1/T) at 1/T = 0 (uniform softmax): mean over images of (mean logit - true-class logit)
    if np.mean(logits.mean(axis=1) - logits[np.arange(len(labels)), labels]) >= 0:
        raise FeatcacheError("The head's validation logits score the true class below the average class; "
                             "temperature scaling cannot calibrate it. Use --calibrate none. Received: calibrate="
                             "'temperature'")
    return search_temperature(lambda inverse: softmax_log_loss(labels, inverse * logits))
