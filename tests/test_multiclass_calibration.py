"""Calibration of multi-class (softmax) heads: top-label ECE, multi-class Brier score and NLL; one temperature
fitted on validation and folded into the head's Dense(k, softmax), argmax unchanged; isotonic refused."""

import numpy as np
import pytest

from featcache.errors import FeatcacheError
from featcache.head import HeadParams, build_head
from featcache.multiclass_calibration import (
    calibration,
    calibration_samples,
    calibration_with_intervals,
    confidence_bins,
    fit_softmax_temperature,
    softmax_log_loss,
)
from featcache.posthoc import calibrate_head, describe_calibration, head_logits, predict_pooled


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sample_labels(rng, probs):
    """One class per row drawn from that row's probabilities."""
    return (rng.uniform(size=(len(probs), 1)) > np.cumsum(probs, axis=1)).sum(axis=1).clip(0, probs.shape[1] - 1)


def test_fit_softmax_temperature_recovers_the_temperature_of_overconfident_logits():
    rng = np.random.default_rng(0)
    honest = rng.normal(0, 2, size=(20_000, 4))
    labels = _sample_labels(rng, _softmax(honest))
    temperature = fit_softmax_temperature(labels, 3.0 * honest)  # the same ranking, three times too sure
    assert temperature == pytest.approx(3.0, rel=0.05)
    assert softmax_log_loss(labels, 3.0 * honest / temperature) < softmax_log_loss(labels, 3.0 * honest)
    assert fit_softmax_temperature(labels, 0.5 * honest) == pytest.approx(0.5, rel=0.05)  # under-confident
    # a wrong temperature is worse: the fitted one is the minimum
    for other in (0.8 * temperature, 1.25 * temperature):
        assert softmax_log_loss(labels, 3.0 * honest / other) > softmax_log_loss(labels, 3.0 * honest / temperature)


def test_fit_softmax_temperature_refuses_what_it_cannot_calibrate():
    with pytest.raises(FeatcacheError, match="at least two classes"):
        fit_softmax_temperature(np.zeros(4, int), np.ones((4, 3)))
    labels = np.array([0, 1, 2, 0])
    wrong = -5.0 * np.eye(3)[labels]  # the true class always scored lowest
    with pytest.raises(FeatcacheError, match="below the average class"):
        fit_softmax_temperature(labels, wrong)


def test_metrics_match_their_definitions_and_scikit_learn():
    from sklearn.metrics import log_loss

    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(3), size=50)
    labels = rng.integers(0, 3, 50)
    point = calibration(labels, probs)
    assert point["nll"] == pytest.approx(log_loss(labels, probs, labels=[0, 1, 2]))
    assert point["brier"] == pytest.approx(np.mean(((probs - np.eye(3)[labels]) ** 2).sum(1)))
    # top-label ECE by hand: per bin of the largest probability, |accuracy - mean confidence| weighted by its share
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    bins = np.minimum((confidence * 10).astype(int), 9)
    ece = sum(np.mean(bins == b) * abs(correct[bins == b].mean() - confidence[bins == b].mean())
              for b in np.unique(bins))
    assert point["ece"] == pytest.approx(ece)
    table = confidence_bins(labels, probs)
    assert sum(b["count"] for b in table) == 50
    # each bootstrap resample scores as the point estimate of that resample
    indices = rng.integers(0, 50, size=(4, 50))
    samples = calibration_samples(labels, probs, indices)
    for b, rows in enumerate(indices):
        again = calibration(labels[rows], probs[rows])
        for name in ("brier", "ece", "nll"):
            assert samples[name][b] == pytest.approx(again[name])
    scored = calibration_with_intervals(labels, probs, n_bootstrap=200, seed=0)
    for entry in scored["metrics"].values():
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]
    # a perfectly confident, always-right model is perfectly calibrated
    perfect = calibration(labels, np.eye(3)[labels])
    assert perfect["ece"] == 0 and perfect["brier"] == 0


def _overconfident_softmax_head(seed=0, n=900, channels=8, classes=3, sharpen=6.0):
    """A softmax head whose validation labels follow softmax(logits / sharpen): its own probabilities are far too
    sure, by a known factor."""
    import keras

    keras.utils.set_random_seed(seed)
    models = build_head((3, 3, channels), HeadParams(units=16, dropout=0.3), classes=classes)
    rng = np.random.default_rng(seed)
    pooled = rng.normal(size=(n, channels)).astype(np.float32)
    models.pooled(pooled[:1])
    output = models.pooled.layers[-1]
    output.kernel.assign(np.asarray(output.kernel) * 30)  # a confident head
    logits = head_logits(models.pooled, pooled)
    labels = _sample_labels(rng, _softmax(logits / sharpen))
    return models, pooled, labels, logits


def test_temperature_is_folded_into_the_softmax_head_argmax_unchanged(tmp_path):
    import keras

    models, pooled, labels, logits = _overconfident_softmax_head()
    assert logits.shape == (900, 3)
    probs = predict_pooled(models.pooled, pooled)
    assert probs.shape == (900, 3) and np.mean(probs.max(1) > 0.95) > 0.5  # mostly near-certain
    after, record = calibrate_head("temperature", models, probs, labels, pooled)
    temperature = record["temperature"]
    assert record["method"] == "temperature" and record["classes"] == 3 and record["images"] == 900
    assert temperature == pytest.approx(6.0, rel=0.25)  # the known sharpening, from 900 labels
    for name in ("log_loss", "ece", "brier"):
        assert record["validation_after"][name] < record["validation_before"][name], name
    assert record["validation_before"]["ece"] == pytest.approx(calibration(labels, probs)["ece"])
    assert "(top-class)" in describe_calibration(record)
    # the head itself now computes softmax(logits / T); the decision is the same for every row
    np.testing.assert_allclose(after, _softmax(logits / temperature), atol=2e-6)
    np.testing.assert_array_equal(after.argmax(1), probs.argmax(1))
    np.testing.assert_array_equal(after, predict_pooled(models.pooled, pooled))
    # the maps head (same layers) saved and reloaded in safe mode: no new layer, the same probabilities
    maps = np.broadcast_to(pooled[:20, None, None, :], (20, 3, 3, pooled.shape[1])).astype(np.float32)
    models.maps.save(tmp_path / "head.keras")
    loaded = keras.saving.load_model(tmp_path / "head.keras", safe_mode=True)
    assert [type(layer).__name__ for layer in loaded.layers] == ["InputLayer", "GlobalAveragePooling2D", "Dense",
                                                                 "Dropout", "Dense"]
    np.testing.assert_allclose(loaded.predict(maps, verbose=0), after[:20], atol=1e-5)


def test_isotonic_is_refused_for_a_softmax_head_in_one_line():
    models, pooled, labels, _ = _overconfident_softmax_head(n=60)
    probs = predict_pooled(models.pooled, pooled)
    weights = [np.array(w) for w in models.pooled.get_weights()]
    with pytest.raises(FeatcacheError, match="binary heads only; a multi-class head takes --calibrate temperature") \
            as error:
        calibrate_head("isotonic", models, probs, labels, pooled)
    assert "\n" not in str(error.value) and "classes=3" in str(error.value)
    assert all(np.array_equal(a, b) for a, b in zip(weights, models.pooled.get_weights()))  # untouched


def test_a_multilabel_head_is_not_taken_for_a_softmax_one():
    import keras

    keras.utils.set_random_seed(0)
    models = build_head((3, 3, 4), HeadParams(units=8), classes=3, multilabel=True)
    pooled = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    probs = np.full((6, 3), 0.5)
    with pytest.raises(FeatcacheError, match=r"binary heads and multi-class \(softmax\) heads.*Dense\(3, sigmoid\)"):
        calibrate_head("temperature", models, probs, np.array([0, 1, 2, 0, 1, 2]), pooled)
