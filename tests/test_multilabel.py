"""The multi-label head (issue 8 part 4, library slice): Dense(k, sigmoid) trained with a masked binary
cross-entropy on pooled vectors whose labels are partly uncertain (NaN, --uncertain ignore)."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.errors import FeatcacheError
from featcache.head import HeadParams
from featcache.multilabel import (
    build_multilabel_head, choose_thresholds, fit_multilabel_head, label_weights, masked_binary_cross_entropy,
    score_multilabel,
)


def separable(n: int, labels: int = 3, channels: int = 16, seed: int = 0, masked: float = 0.2):
    """Pooled vectors that add one direction per present label; ``masked`` of the targets set to NaN."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, labels)) < 0.4).astype(np.float32)
    directions = np.random.default_rng(99).normal(size=(labels, channels))
    pooled = np.maximum(3.0 * targets @ directions + rng.normal(size=(n, channels)), 0).astype(np.float32)
    targets[rng.random((n, labels)) < masked] = np.nan
    return pooled, targets


def fit(pooled, targets, val, val_targets, seed=0, epochs=15):
    import keras

    keras.utils.set_random_seed(seed)
    params = HeadParams(units=32, learning_rate=3e-3, batch_size=32, class_weight=True)
    models = build_multilabel_head((2, 2, 16), params, labels=targets.shape[1])
    result = fit_multilabel_head(models, pooled, targets, np.arange(len(pooled)), val, val_targets, params,
                                 seed=seed, max_epochs=epochs, patience=5)
    return models, result


def test_multilabel_head_learns_each_label_despite_masked_targets(tmp_path):
    import keras

    pooled, targets = separable(300)
    val, val_targets = separable(120, seed=1)
    models, result = fit(pooled, targets, val, val_targets)
    assert result.probs.shape == (120, 3)
    assert min(result.scores["per_label_roc_auc"]) >= 0.95, result.scores
    thresholds = choose_thresholds(val_targets, result.probs)
    assert len(thresholds) == 3 and all(0 < t <= 1 for t in thresholds)
    assert score_multilabel(val_targets, result.probs, thresholds)["sensitivity"] > 0.8
    path = tmp_path / "head.keras"
    models.maps.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.output_shape == (None, 3) and loaded.layers[-1].activation.__name__ == "sigmoid"
    maps = np.repeat(np.repeat(val[:, None, None, :], 2, 1), 2, 2)  # constant maps: their mean is the vector
    np.testing.assert_allclose(loaded.predict_on_batch(maps), result.probs, atol=1e-5)


def test_multilabel_head_cannot_learn_shuffled_targets():
    pooled, targets = separable(300)
    val, val_targets = separable(120, seed=1)
    rng = np.random.default_rng(3)
    _, result = fit(pooled, rng.permutation(targets), val, rng.permutation(val_targets), epochs=8)
    assert result.scores["roc_auc"] < 0.75, result.scores


def test_masked_targets_add_nothing():
    targets = np.array([[1, np.nan], [0, 1], [np.nan, 0]], np.float32)
    probs = np.array([[0.9, 0.2], [0.3, 0.6], [0.5, 0.1]])
    known = [(0, 0), (1, 0), (1, 1), (2, 1)]
    expected = np.mean([-np.log(probs[i, j]) if targets[i, j] == 1 else -np.log(1 - probs[i, j]) for i, j in known])
    assert masked_binary_cross_entropy(targets, probs) == pytest.approx(expected)
    weights = label_weights(targets, balanced=False)
    np.testing.assert_array_equal(weights, [[1, 0], [1, 1], [0, 1]])
    balanced = label_weights(targets, balanced=True)  # label 0: one positive, one negative -> 1 each
    np.testing.assert_allclose(balanced, [[1, 0], [1, 1], [0, 1]])
    with pytest.raises(FeatcacheError, match="both values of every label"):
        score_multilabel(np.array([[1.0], [1.0]]), np.array([[0.5], [0.6]]))
