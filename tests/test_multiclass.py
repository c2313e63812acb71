"""Multi-class heads (issue 8 part 4): three or more classes get Dense(n, softmax) trained with categorical
cross-entropy, a multinomial probe, argmax decisions and per-class/macro metrics, end to end."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.errors import FeatcacheError
from featcache.head import HeadParams, TrainViews, build_head, choose_threshold, fit_head, input_stats, score_probs


def separable(n: int, classes: int = 3, channels: int = 16, seed: int = 0, spread: float = 3.0):
    """(n, channels) pooled vectors whose class k is shifted by ``spread`` along its own direction."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    directions = np.random.default_rng(1234).normal(size=(classes, channels))  # the same for every split
    pooled = np.maximum(spread * directions[labels] + rng.normal(size=(n, channels)), 0).astype(np.float32)
    return pooled, labels


def test_softmax_head_learns_separable_classes():
    import keras

    train, train_labels = separable(240)
    val, val_labels = separable(90, seed=1)
    keras.utils.set_random_seed(0)
    params = HeadParams(units=32, learning_rate=3e-3, batch_size=32)
    models = build_head((2, 2, 16), params, classes=3)
    assert models.maps.output_shape == (None, 3) and models.maps.layers[-1].activation.__name__ == "softmax"
    views = TrainViews(train, train_labels, np.arange(len(train)))
    result = fit_head(models, views, val, val_labels, params, seed=0, max_epochs=15, patience=5)
    assert result.probs.shape == (90, 3)
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, atol=1e-5)
    assert result.scores["roc_auc"] >= 0.95, result.scores
    assert result.scores["accuracy"] > 0.8, result.scores
    # the restored weights are the model's: the pooled twin reproduces the scored probabilities
    np.testing.assert_allclose(models.pooled.predict_on_batch(val), result.probs, atol=1e-5)
    assert choose_threshold(val_labels, result.probs) == (0.0, "argmax")


def test_softmax_head_cannot_learn_shuffled_labels():
    """The same fit on labels unrelated to the vectors stays near chance: the test above can fail."""
    import keras

    train, train_labels = separable(240)
    val, val_labels = separable(90, seed=1)
    rng = np.random.default_rng(5)
    keras.utils.set_random_seed(0)
    params = HeadParams(units=32, learning_rate=3e-3, batch_size=32)
    models = build_head((2, 2, 16), params, classes=3)
    views = TrainViews(train, rng.permutation(train_labels), np.arange(len(train)))
    result = fit_head(models, views, val, rng.permutation(val_labels), params, seed=0, max_epochs=8, patience=3)
    assert result.scores["roc_auc"] < 0.75, result.scores


def test_multinomial_probe_learns_separable_classes():
    from featcache.multiclass import MulticlassProbe
    from featcache.probe import Probe, fit_probe

    train, train_labels = separable(240)
    val, val_labels = separable(90, seed=1)
    probe = fit_probe(train, train_labels, val, val_labels, input_stats(train))
    assert isinstance(probe, MulticlassProbe) and probe.coef.shape == (3, 16)
    assert probe.val_scores["roc_auc"] >= 0.95, probe.val_scores
    again = Probe.from_dict(probe.to_dict())
    np.testing.assert_array_equal(again.predict(val), probe.predict(val))
    np.testing.assert_allclose(probe.predict(val).sum(axis=1), 1.0)


def test_multiclass_scores_are_macro_one_vs_rest():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    probs = rng.dirichlet(np.ones(3), size=60)
    probs[np.arange(60), labels] += 0.3
    probs /= probs.sum(axis=1, keepdims=True)
    scores = score_probs(labels, probs)
    assert scores["roc_auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert scores["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels))
    recall = [np.mean(probs.argmax(1)[labels == k] == k) for k in range(3)]
    assert scores["sensitivity"] == pytest.approx(np.mean(recall))
    with pytest.raises(FeatcacheError, match="every one of the 3 classes"):
        score_probs(labels[labels < 2], probs[labels < 2])


def test_binary_head_is_unchanged():
    """classes=2 (the default) is the reference Dense(1, sigmoid) head."""
    params = HeadParams(units=8)
    models = build_head((2, 2, 4), params, classes=2)
    assert models.maps.output_shape == (None, 1) and models.maps.layers[-1].activation.__name__ == "sigmoid"
