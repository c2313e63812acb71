"""The multi-class head (three or more classes): Dense(n, softmax) on the same GAP -> [Normalization] ->
Dense -> Dropout trunk as the reference head, trained with categorical cross-entropy on the cached pooled
vectors; its validation scores, and the multinomial linear probe.

Two classes never come here: they keep the reference head (Dense(1, sigmoid), ``featcache.head``) bit for
bit. ``head.build_head(..., classes=n)``, ``head.fit_head``, ``head.score_probs``, ``head.choose_threshold``
and ``probe.fit_probe`` hand over to this module when there are more than two classes (their probabilities
are then (m, n) instead of (m,)).

What changes with n classes:

- the decision is the argmax of the n probabilities; a threshold has no meaning (the Youden or
  ``--min-sensitivity`` rule is a binary rule), so head.json and model.json record ``threshold`` 0 with
  ``threshold_method`` ``"argmax"``;
- ``roc_auc`` is the macro average of the one-vs-rest ROC-AUC of each class, the selection criterion;
  ``sensitivity`` and ``specificity`` are the macro averages of each class's one-vs-rest recall and
  specificity at the argmax decision; ``loss`` is the mean categorical cross-entropy;
- ``class_weight`` gives each class ``n / (k n_class)`` (sklearn's ``'balanced'`` for k classes).

The trainer is ``trainer._Trainer`` (the same fused Adam, batches, dropout seeds and epochs) with the softmax
cross-entropy in place of the sigmoid one. Pure computation, no file IO.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from featcache.errors import FeatcacheError
from featcache.head import EPSILON, FitResult, HeadModels, HeadParams, InputStats, TrainViews
from featcache.trainer import HeadTask, _class_logits, _Trainer, class_predict_graph, fit_epochs

ARGMAX = "argmax"  # threshold_method of a multi-class head
ARGMAX_THRESHOLD = 0.0  # what head.json / model.json record as ``threshold`` for it (unused)


def is_multiclass(class_names) -> bool:
    return len(class_names) > 2


def class_weights(labels: np.ndarray, classes: int) -> np.ndarray:
    """Balanced weights ``n / (k n_class)`` of classes 0..k-1, as sklearn's ``class_weight='balanced'``."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=classes)[:classes]
    return (len(labels) / (classes * np.maximum(counts, 1))).astype(np.float32)


def categorical_cross_entropy(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Mean categorical cross-entropy of (m, k) probabilities clipped to [EPSILON, 1 - EPSILON]; with
    ``weights``, the weighted mean."""
    labels = np.asarray(labels, np.int64)
    picked = np.clip(np.asarray(probs, np.float64)[np.arange(len(labels)), labels], EPSILON, 1 - EPSILON)
    return float(np.average(-np.log(picked), weights=weights))


def one_vs_rest_auc(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(k,) ROC-AUC of each class against the rest; NaN for a class absent (or alone) in ``labels``."""
    from sklearn.metrics import roc_auc_score

    labels, probs = np.asarray(labels, np.int64), np.asarray(probs, np.float64)
    out = np.full(probs.shape[1], np.nan)
    for k in range(probs.shape[1]):
        positive = labels == k
        if 0 < positive.sum() < len(labels):
            out[k] = roc_auc_score(positive, probs[:, k])
    return out


def score_multiclass(labels: np.ndarray, probs: np.ndarray) -> dict:
    """Validation scores of (m, k) probabilities: ``loss`` (categorical cross-entropy), ``roc_auc`` (macro
    one-vs-rest), ``accuracy``, ``sensitivity`` and ``specificity`` (macro one-vs-rest) at the argmax.

    Raises:
        FeatcacheError: ``labels`` lacks one of the k classes (its ROC-AUC is undefined).
    """
    labels = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    classes = probs.shape[1]
    missing = sorted(set(range(classes)) - set(np.unique(labels).tolist()))
    if missing:
        raise FeatcacheError(f"Validation needs every one of the {classes} classes to score a head. "
                             f"Received: missing_classes={missing}")
    predicted = probs.argmax(axis=1)
    recall = np.array([np.mean(predicted[labels == k] == k) for k in range(classes)])
    specificity = np.array([np.mean(predicted[labels != k] != k) for k in range(classes)])
    return {
        "loss": categorical_cross_entropy(labels, probs),
        "roc_auc": float(np.mean(one_vs_rest_auc(labels, probs))),
        "accuracy": float(np.mean(predicted == labels)),
        "sensitivity": float(recall.mean()),
        "specificity": float(specificity.mean()),
    }


def fit_softmax_head(models: HeadModels, train: TrainViews, val_pooled, val_labels: np.ndarray, params: HeadParams,
                     *, seed: int, max_epochs: int = 30, patience: int = 5,
                     on_epoch: Callable[[int, dict], bool] | None = None) -> FitResult:
    """``head.fit_head`` for a softmax head of k outputs: the same epochs, batches, Adam and early stopping on
    the (class-weighted) validation loss, with categorical cross-entropy. ``FitResult.probs`` is (m, k)."""
    classes = int(models.pooled.output_shape[-1])
    weight_of = class_weights(train.labels, classes) if params.class_weight else np.ones(classes, np.float32)
    labels = np.asarray(train.labels, np.int64)  # class index as float: the trainer's signature
    loss = categorical_cross_entropy if params.class_weight else None
    return fit_epochs(models, SOFTMAX_TASK, train, labels.astype(np.float32), weight_of[labels], val_pooled,
                      val_labels, weight_of[np.asarray(val_labels, np.int64)], loss, params, seed=seed,
                      max_epochs=max_epochs, patience=patience, on_epoch=on_epoch)


class _SoftmaxTrainer(_Trainer):
    """``trainer._Trainer`` whose loss is the softmax cross-entropy of k logits (labels come as float class
    indices, so the traced signature and the streamed epochs are the binary trainer's)."""

    def _batch_loss(self, weights, x, y, w, rate, seed):
        import tensorflow as tf

        z = _class_logits(weights, x, rate, seed)
        loss = tf.reduce_sum(w * tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.int32), logits=z))
        return loss / tf.cast(tf.size(y), tf.float32)


@functools.cache
def _softmax_trainer(shapes: tuple[tuple[int, ...], ...]) -> _SoftmaxTrainer:
    return _SoftmaxTrainer(shapes)


SOFTMAX_TASK = HeadTask(trainer=_softmax_trainer, predict=lambda: class_predict_graph("softmax"),
                        score=lambda labels, probs: score_multiclass(labels, probs))


# --- the multinomial linear probe ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearProbeK:
    """A fitted linear probe with k outputs on the standardized pooled vectors: ``coef`` (k, c), ``intercept``
    (k,); otherwise as ``probe.Probe``. ``predict`` (the link) is the subclass's: softmax or per-label sigmoid."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    c: float
    val_scores: dict
    train_rows: int = 0

    KIND = ""

    def logits(self, pooled: np.ndarray) -> np.ndarray:
        """(n, c) pooled vectors -> (n, k) float64 logits, each row on its own (einsum)."""
        z = np.einsum("ij,kj->ik", (np.asarray(pooled, np.float64) - self.mean) / self.scale, self.coef)
        return z + self.intercept

    def to_dict(self) -> dict:
        return {"kind": self.KIND, "c": self.c, "intercept": self.intercept.tolist(), "mean": self.mean.tolist(),
                "scale": self.scale.tolist(), "coef": self.coef.tolist(), "val_scores": self.val_scores,
                "train_rows": self.train_rows}

    @classmethod
    def from_dict(cls, record: dict):
        return cls(np.asarray(record["mean"], np.float64), np.asarray(record["scale"], np.float64),
                   np.asarray(record["coef"], np.float64), np.asarray(record["intercept"], np.float64),
                   float(record["c"]), record["val_scores"], int(record.get("train_rows", 0)))


@dataclass(frozen=True)
class MulticlassProbe(LinearProbeK):
    """A fitted multinomial probe: ``softmax(((x - mean) / scale) @ coef.T + intercept)``."""

    KIND = "StandardScaler + LogisticRegression(multinomial, l2, lbfgs)"

    def predict(self, pooled: np.ndarray) -> np.ndarray:
        """(n, c) pooled vectors -> (n, k) float64 class probabilities, each row on its own (einsum)."""
        z = self.logits(pooled)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def fit_multiclass_probe(train_pooled: np.ndarray, train_labels: np.ndarray, val_pooled, val_labels: np.ndarray,
                         stats: InputStats | None, grid: tuple[float, ...], max_iter: int,
                         overwrite: bool = False) -> MulticlassProbe:
    """``probe.fit_probe`` with k classes: a multinomial logistic regression (lbfgs) per C of ``grid``, the C
    with the best validation macro one-vs-rest ROC-AUC kept (ties to the smaller C)."""
    from sklearn.linear_model import LogisticRegression

    from featcache.probe import best_of_grid, predict_in_batches, standardized_rows

    x_train, mean, scale = standardized_rows(train_pooled, stats, overwrite)
    model = LogisticRegression(max_iter=max_iter, warm_start=True)  # lbfgs: multinomial for k > 2

    def fit(c: float) -> tuple[MulticlassProbe, dict]:
        model.set_params(C=c)
        model.fit(x_train, np.asarray(train_labels, np.int64))
        coef = np.array(model.coef_, np.float64, order="C")  # as from_dict rebuilds it: the same einsum sums
        probe = MulticlassProbe(mean, scale, coef, model.intercept_.astype(np.float64), float(c), {})
        return probe, score_multiclass(val_labels, predict_in_batches(probe, val_pooled))

    best, val_scores = best_of_grid(grid, fit)
    return MulticlassProbe(best.mean, best.scale, best.coef, best.intercept, best.c, val_scores, len(x_train))
