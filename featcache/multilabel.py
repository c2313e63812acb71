"""The multi-label head (several 0/1 label columns, e.g. CheXpert's findings): Dense(k, sigmoid) on the
reference trunk, trained on cached pooled vectors with a masked binary cross-entropy, its validation scores
and per-label decision thresholds.

Targets are (n, k) float 0/1 with NaN where a label is masked (``--uncertain ignore``: CheXpert's -1 and
blanks, ``labels.LabelFile.targets``); a masked entry adds nothing to the loss, the metrics or the
thresholds. ``class_weight`` weighs, label by label, the positives by ``n / (2 n_pos)`` and the negatives by
``n / (2 n_neg)`` (counted over the label's unmasked rows). Selection: validation macro ROC-AUC (the mean
over labels of each label's ROC-AUC on its unmasked rows); thresholds: Youden's J per label on validation.

A multi-label cache (``cache.is_multilabel``) stores the targets as /targets; ``train-head`` reaches this module
through ``head.fit_head`` (2-D labels), ``probe.fit_probe`` (the per-label probe floor, ``MultilabelProbe``) and
``tune`` (per-label thresholds, the majority floor). head.json records ``threshold`` as ``PER_LABEL_THRESHOLD``
(unused) and the real ones in ``thresholds``, one per label. Pure computation, no file IO.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from featcache.errors import FeatcacheError
from featcache.head import EPSILON, FitResult, HeadModels, HeadParams, InputStats, TrainViews, choose_threshold
from featcache.multiclass import LinearProbeK
from featcache.trainer import HeadTask, _class_logits, _Trainer, class_predict_graph, fit_epochs

PER_LABEL_THRESHOLD = 0.0  # head.json / model.json ``threshold`` of a multi-label head (unused: see ``thresholds``)
PER_LABEL = "per label"  # prefix of a multi-label head's threshold_method: "per label youden" or "per label min_..."


def threshold_method(min_sensitivity: float | None) -> str:
    """head.json's ``threshold_method`` of a multi-label head: each label's rule, applied per label."""
    return f"{PER_LABEL} " + ("youden" if min_sensitivity is None else f"min_sensitivity={min_sensitivity:g}")


def label_weights(targets: np.ndarray, balanced: bool) -> np.ndarray:
    """(n, k) float32 loss weights: 0 where masked (NaN), else 1, or with ``balanced`` ``n / (2 n_pos)`` for a
    positive and ``n / (2 n_neg)`` for a negative of that label (n, n_pos, n_neg over its unmasked rows)."""
    targets = np.asarray(targets, np.float64)
    known = np.isfinite(targets)
    if not balanced:
        return known.astype(np.float32)
    positive = known & (np.nan_to_num(targets) == 1)
    n, n_pos = known.sum(0), positive.sum(0)
    w_pos, w_neg = n / (2.0 * np.maximum(n_pos, 1)), n / (2.0 * np.maximum(n - n_pos, 1))
    return np.where(known, np.where(positive, w_pos, w_neg), 0.0).astype(np.float32)


def masked_binary_cross_entropy(targets: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Mean BCE over the unmasked entries of (m, k) targets, probabilities clipped as Keras clips them."""
    targets = np.asarray(targets, np.float64)
    known = np.isfinite(targets)
    y = np.nan_to_num(targets)
    p = np.clip(np.asarray(probs, np.float64), EPSILON, 1 - EPSILON)
    losses = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    w = known.astype(np.float64) if weights is None else np.asarray(weights, np.float64) * known
    return float((losses * w).sum() / max(w.sum(), 1e-12))


def per_label_auc(targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(k,) ROC-AUC of each label on its unmasked rows; NaN for a label with one value there."""
    from sklearn.metrics import roc_auc_score

    targets, probs = np.asarray(targets, np.float64), np.asarray(probs, np.float64)
    out = np.full(targets.shape[1], np.nan)
    for j in range(targets.shape[1]):
        known = np.isfinite(targets[:, j])
        if len(np.unique(targets[known, j])) == 2:
            out[j] = roc_auc_score(targets[known, j], probs[known, j])
    return out


def score_multilabel(targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray | None = None) -> dict:
    """Validation scores: masked BCE ``loss``, macro ``roc_auc``, and, at ``thresholds`` (default 0.5 each),
    macro ``accuracy``, ``sensitivity`` and ``specificity`` over each label's unmasked rows.

    Raises:
        FeatcacheError: a label without both values among its unmasked rows (its ROC-AUC is undefined).
    """
    targets, probs = np.asarray(targets, np.float64), np.asarray(probs, np.float64)
    auc = per_label_auc(targets, probs)
    if np.isnan(auc).any():
        raise FeatcacheError(f"Validation needs both values of every label to score a head. "
                             f"Received: labels_without_both={np.flatnonzero(np.isnan(auc)).tolist()}")
    thresholds = np.full(targets.shape[1], 0.5) if thresholds is None else np.asarray(thresholds, np.float64)
    accuracy, sensitivity, specificity = [], [], []
    for j in range(targets.shape[1]):
        known = np.isfinite(targets[:, j])
        y, called = targets[known, j] == 1, probs[known, j] >= thresholds[j]
        accuracy.append(np.mean(y == called))
        sensitivity.append(np.mean(called[y]))
        specificity.append(np.mean(~called[~y]))
    return {"loss": masked_binary_cross_entropy(targets, probs), "roc_auc": float(auc.mean()),
            "accuracy": float(np.mean(accuracy)), "sensitivity": float(np.mean(sensitivity)),
            "specificity": float(np.mean(specificity)), "per_label_roc_auc": auc.tolist()}


def choose_thresholds(targets: np.ndarray, probs: np.ndarray, min_sensitivity: float | None = None) -> list[float]:
    """Per-label decision thresholds on validation (``head.choose_threshold`` on each label's unmasked rows)."""
    targets = np.asarray(targets, np.float64)
    out = []
    for j in range(targets.shape[1]):
        known = np.isfinite(targets[:, j])
        out.append(choose_threshold(targets[known, j], np.asarray(probs)[known, j], min_sensitivity)[0])
    return out


def build_multilabel_head(feature_shape: tuple[int, int, int], params: HeadParams, labels: int,
                          stats=None) -> HeadModels:
    """The reference trunk with Dense(labels, sigmoid): one independent probability per label."""
    from featcache.head import build_head

    return build_head(feature_shape, params, stats, classes=labels, multilabel=True)


def fit_multilabel_head(models: HeadModels, pooled: np.ndarray, targets: np.ndarray, source_index: np.ndarray,
                        val_pooled: np.ndarray, val_targets: np.ndarray, params: HeadParams, *, seed: int,
                        max_epochs: int = 30, patience: int = 5,
                        on_epoch: Callable[[int, dict], bool] | None = None) -> FitResult:
    """``head.fit_head`` for k sigmoid outputs on (n, k) targets with NaN masks: the same epochs (one view per
    image), batches, Adam and early stopping on the validation (label-weighted) masked BCE."""
    train = TrainViews(pooled, np.asarray(targets, np.float32), source_index)
    return fit_multilabel_views(models, train, val_pooled, val_targets, params, seed=seed, max_epochs=max_epochs,
                                patience=patience, on_epoch=on_epoch)


def fit_multilabel_views(models: HeadModels, train: TrainViews, val_pooled, val_targets: np.ndarray,
                         params: HeadParams, *, seed: int, max_epochs: int = 30, patience: int = 5,
                         on_epoch: Callable[[int, dict], bool] | None = None) -> FitResult:
    """``fit_multilabel_head`` on ``TrainViews`` whose ``labels`` are (n, k) targets (held or streamed views):
    what ``head.fit_head`` calls for 2-D labels."""
    targets = np.asarray(train.labels, np.float32)
    loss = masked_binary_cross_entropy if params.class_weight else None
    return fit_epochs(models, MULTILABEL_TASK, train, np.nan_to_num(targets).astype(np.float32),
                      label_weights(targets, params.class_weight), val_pooled, val_targets,
                      label_weights(val_targets, params.class_weight), loss, params, seed=seed, max_epochs=max_epochs,
                      patience=patience, on_epoch=on_epoch)


def majority_floor(train_targets: np.ndarray, targets: np.ndarray) -> dict:
    """Always each label's training majority value, scored on ``targets`` (unmasked entries): per-label and
    macro accuracy; its ROC-AUC is 0.5 (a constant ranks nothing)."""
    train_targets, targets = np.asarray(train_targets, np.float64), np.asarray(targets, np.float64)
    majority, accuracy = [], []
    for j in range(targets.shape[1]):
        known = train_targets[np.isfinite(train_targets[:, j]), j]
        value = int(known.mean() > 0.5) if len(known) else 0
        scored = targets[np.isfinite(targets[:, j]), j]
        majority.append(value)
        accuracy.append(float(np.mean(scored == value)) if len(scored) else float("nan"))
    return {"majority": majority, "per_label_accuracy": accuracy, "accuracy": float(np.nanmean(accuracy)),
            "roc_auc": 0.5}


class _MultilabelTrainer(_Trainer):
    """``trainer._Trainer`` on (n, k) targets and (n, k) loss weights (0 where masked): the masked, weighted
    sigmoid cross-entropy, summed and divided by the batch's unmasked entries."""

    TARGET_RANK = 2

    def _batch_loss(self, weights, x, y, w, rate, seed):
        import tensorflow as tf

        z = _class_logits(weights, x, rate, seed)
        loss = tf.reduce_sum(w * tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=z))
        return loss / tf.maximum(tf.reduce_sum(tf.cast(w > 0, tf.float32)), 1.0)


@functools.cache
def _multilabel_trainer(shapes: tuple[tuple[int, ...], ...]) -> _MultilabelTrainer:
    return _MultilabelTrainer(shapes)


MULTILABEL_TASK = HeadTask(trainer=_multilabel_trainer, predict=lambda: class_predict_graph("sigmoid"),
                           score=lambda targets, probs: score_multilabel(targets, probs))


# --- the per-label linear probe --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MultilabelProbe(LinearProbeK):
    """One logistic regression per label on the standardized pooled vectors: ``sigmoid(((x - mean) / scale) @
    coef.T + intercept)``, ``coef`` (k, c), ``intercept`` (k,), each fitted on its label's unmasked training rows;
    one C for all labels (the best validation macro ROC-AUC). Otherwise as ``probe.Probe``."""

    KIND = "StandardScaler + LogisticRegression(l2, lbfgs) per label"

    def predict(self, pooled: np.ndarray) -> np.ndarray:
        """(n, c) pooled vectors -> (n, k) float64 probabilities, each row on its own (einsum)."""
        return 1.0 / (1.0 + np.exp(-self.logits(pooled)))


def fit_multilabel_probe(train_pooled: np.ndarray, train_targets: np.ndarray, val_pooled, val_targets: np.ndarray,
                         stats: InputStats | None, grid: tuple[float, ...], max_iter: int,
                         overwrite: bool = False) -> MultilabelProbe:
    """``probe.fit_probe`` for (n, k) targets: per C of ``grid``, one logistic regression per label on that label's
    unmasked training rows (the same standardized features); the C with the best validation macro ROC-AUC is
    kept (ties to the smaller C)."""
    from sklearn.linear_model import LogisticRegression

    from featcache.probe import best_of_grid, predict_in_batches, standardized_rows

    x_train, mean, scale = standardized_rows(train_pooled, stats, overwrite)
    train_targets = np.asarray(train_targets, np.float64)
    k = train_targets.shape[1]
    models = [LogisticRegression(max_iter=max_iter, warm_start=True) for _ in range(k)]
    known = [np.flatnonzero(np.isfinite(train_targets[:, j])) for j in range(k)]

    def fit(c: float) -> tuple[MultilabelProbe, dict]:
        for j, model in enumerate(models):
            model.set_params(C=c)
            model.fit(x_train[known[j]], train_targets[known[j], j].astype(np.int64))
        coef = np.array([m.coef_[0] for m in models], np.float64, order="C")
        probe = MultilabelProbe(mean, scale, coef, np.array([m.intercept_[0] for m in models], np.float64), float(c), {})
        return probe, score_multilabel(val_targets, predict_in_batches(probe, val_pooled))

    best, val_scores = best_of_grid(grid, fit)
    return MultilabelProbe(best.mean, best.scale, best.coef, best.intercept, best.c, val_scores, len(x_train))
