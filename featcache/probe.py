"""The linear probe: a standardized logistic regression on the same cached pooled vectors as the head.

It is the honest floor every tuned head is shown beside (``train-head`` records its validation
scores, ``evaluate`` its test scores): a head below the probe has lost what the features hold. The
probe never takes part in selection or export. Pure computation, no file IO.

Within a memory budget (``views.probe_rows``) a cache too large to hold is probed on a seeded subsample of one
view per image, of as many images as fit half the budget. Why a subsample rather than a streaming SGD
logistic regression: the probe is a floor, so it must be a converged, deterministic fit with the C chosen on
validation, which lbfgs on a subsample is and an SGD pass with its learning-rate schedule is not; a linear
model on 2,048 features is estimated well from tens of thousands of images (the budget's default holds 65,536
ResNet152 rows), and it is still standardized with the statistics of every training view, and scored on every
validation image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from featcache.head import InputStats, input_stats, score_probs

C_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # inverse L2 strength, chosen on validation ROC-AUC
MAX_ITER = 500
PREDICT_ROWS = 1024  # validation rows scored at a time


@dataclass(frozen=True)
class Probe:
    """A fitted probe: ``sigmoid(((x - mean) / scale) @ coef + intercept)``.

    Attributes:
        mean, scale: (c,) float64 StandardScaler statistics of the training views.
        coef: (c,) float64 logistic-regression weights on the standardized inputs.
        intercept: float.
        c: the chosen inverse regularisation strength.
        val_scores: ``score_probs`` of the validation rows at 0.5, plus ``grid`` (C -> validation ROC-AUC).
    """

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    c: float
    val_scores: dict
    train_rows: int = 0  # training rows it was fitted on (a subsample when the cache exceeds the memory budget)

    def predict(self, pooled: np.ndarray) -> np.ndarray:
        """(n, c) pooled vectors -> (n,) float64 probability of class 1.

        Row by row: a row's probability does not depend on the other rows passed with it (``evaluate`` scores
        the test images a batch at a time). BLAS's matrix-vector product does not promise that; einsum's
        own loop sums each row in one fixed order.
        """
        z = np.einsum("ij,j->i", (np.asarray(pooled, np.float64) - self.mean) / self.scale, self.coef) + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict:
        return {"kind": "StandardScaler + LogisticRegression(l2, lbfgs)", "c": self.c, "intercept": self.intercept,
                "mean": self.mean.tolist(), "scale": self.scale.tolist(), "coef": self.coef.tolist(),
                "val_scores": self.val_scores, "train_rows": self.train_rows}

    @classmethod
    def from_dict(cls, record: dict) -> "Probe":
        if str(record.get("kind", "")).endswith("per label"):  # a multi-label cache's probe
            from featcache.multilabel import MultilabelProbe

            return MultilabelProbe.from_dict(record)
        if "multinomial" in str(record.get("kind", "")):  # a multi-class cache's probe
            from featcache.multiclass import MulticlassProbe

            return MulticlassProbe.from_dict(record)
        return cls(np.asarray(record["mean"], np.float64), np.asarray(record["scale"], np.float64),
                   np.asarray(record["coef"], np.float64), float(record["intercept"]), float(record["c"]),
                   record["val_scores"], int(record.get("train_rows", 0)))


def fit_probe(train_pooled: np.ndarray, train_labels: np.ndarray, val_pooled: np.ndarray, val_labels: np.ndarray,
              stats: InputStats | None = None, grid: tuple[float, ...] = C_GRID, overwrite: bool = False) -> Probe:
    """Fit the probe on training views for each C of ``grid``; keep the C with the best validation ROC-AUC.

    The standardization is the head's (``head.input_stats``: StandardScaler's mean and scale of the
    training views), applied in float32, in one copy of the training rows. Deterministic (lbfgs, no
    random state). Ties in validation ROC-AUC go to the smaller C (the stronger regularisation). Each
    fit starts from the previous one's solution (``warm_start``), from the strongest regularisation up.

    Args:
        train_pooled: (n, c) pooled vectors of the training views (originals and augmented copies).
        train_labels: (n,) 0/1.
        val_pooled: (m, c) validation originals.
        val_labels: (m,) 0/1, both classes present.
        stats: the training views' ``input_stats`` when the caller has them already.
        overwrite: standardize ``train_pooled`` (float32) in place rather than in a copy: the same values, half
            the memory.

    Returns:
        The chosen Probe, its validation scores and the whole grid's validation ROC-AUC.
    """
    from sklearn.linear_model import LogisticRegression

    if np.ndim(train_labels) == 2:  # (n, k) targets: one regression per label (featcache.multilabel)
        from featcache.multilabel import fit_multilabel_probe

        return fit_multilabel_probe(train_pooled, train_labels, val_pooled, val_labels, stats, grid, MAX_ITER,
                                    overwrite)
    if np.max(train_labels) > 1:  # three or more classes: the multinomial probe (featcache.multiclass)
        from featcache.multiclass import fit_multiclass_probe

        return fit_multiclass_probe(train_pooled, train_labels, val_pooled, val_labels, stats, grid, MAX_ITER,
                                    overwrite)
    x_train, mean, scale = standardized_rows(train_pooled, stats, overwrite)
    model = LogisticRegression(max_iter=MAX_ITER, warm_start=True)

    def fit(c: float) -> tuple[Probe, dict]:
        model.set_params(C=c)
        model.fit(x_train, np.asarray(train_labels, np.int64))
        probe = Probe(mean, scale, model.coef_[0].astype(np.float64), float(model.intercept_[0]), float(c), {})
        return probe, score_probs(val_labels, predict_in_batches(probe, val_pooled))

    best, val_scores = best_of_grid(grid, fit)
    return Probe(best.mean, best.scale, best.coef, best.intercept, best.c, val_scores, len(x_train))


def best_of_grid(grid: tuple[float, ...], fit: Callable[[float], tuple]) -> tuple:
    """Fit a probe per C of ``grid`` with ``fit(c) -> (probe, validation scores)``, the smallest C first (each fit
    may warm-start from the one before); keep the best validation ROC-AUC, ties to the smaller C.

    Returns:
        (the chosen probe, its validation scores with the whole grid's ROC-AUC under ``"grid"``).
    """
    best, scores = None, {}
    for c in sorted(grid):
        probe, scores[c] = fit(c)
        if best is None or scores[c]["roc_auc"] > scores[best.c]["roc_auc"]:
            best = probe
    return best, {**scores[best.c], "grid": {f"{c:g}": scores[c]["roc_auc"] for c in sorted(grid)}}


def standardized_rows(train_pooled: np.ndarray, stats: InputStats | None, overwrite: bool
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float32 standardized training rows, float64 mean, float64 scale) for a probe: the head's statistics
    (``input_stats`` when ``stats`` is None), in one copy, or in place with ``overwrite`` on float32 rows."""
    stats = stats if stats is not None else input_stats(train_pooled)
    mean, scale = stats.mean.astype(np.float64), np.sqrt(stats.variance.astype(np.float64))
    if overwrite and isinstance(train_pooled, np.ndarray) and train_pooled.dtype == np.float32:
        x_train = np.subtract(train_pooled, stats.mean, out=train_pooled)
    else:
        x_train = np.subtract(train_pooled, stats.mean, dtype=np.float32)
    x_train /= np.sqrt(stats.variance)
    return x_train, mean, scale


def predict_in_batches(probe, val_pooled) -> np.ndarray:
    """A probe's probabilities (any probe with ``predict``: binary, multinomial, per-label) of validation rows (an
    array, or an object whose ``batches()`` yields them), a batch at a time: ``predict`` holds a float64 copy of
    what it is given, and scores each row alone."""
    if hasattr(val_pooled, "batches"):
        return np.concatenate([probe.predict(batch) for batch in val_pooled.batches()])
    return np.concatenate([probe.predict(val_pooled[start:start + PREDICT_ROWS])
                           for start in range(0, len(val_pooled), PREDICT_ROWS)])
