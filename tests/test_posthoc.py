"""Post-hoc calibration (train-head --calibrate): temperature scaling folded into the head, the isotonic lookup,
both fitted on the validation rows only and after the choice of the head."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from featcache.config import TrainHeadConfig
from featcache.errors import FeatcacheError
from featcache.head import HeadParams, binary_cross_entropy, build_head
from featcache.posthoc import (
    apply_isotonic,
    calibrate_head,
    fit_isotonic,
    fit_temperature,
    head_logits,
    logit_log_loss,
    predict_pooled,
)
from featcache.runs import load_head_record, run_dir_for
from featcache.tune import load_head_data, train_heads

FAST = dict(max_epochs=6, patience=3, progress=False)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_fit_temperature_recovers_the_temperature_of_overconfident_logits():
    rng = np.random.default_rng(0)
    honest = rng.normal(0, 2, size=20_000)
    labels = (rng.uniform(size=honest.size) < _sigmoid(honest)).astype(int)
    temperature = fit_temperature(labels, 4.0 * honest)  # the same ranking, four times too sure
    assert temperature == pytest.approx(4.0, rel=0.05)
    assert logit_log_loss(labels, 4.0 * honest / temperature) < logit_log_loss(labels, 4.0 * honest)
    assert fit_temperature(labels, 0.25 * honest) == pytest.approx(0.25, rel=0.05)  # under-confident: T < 1


def test_fit_temperature_refuses_what_it_cannot_calibrate():
    with pytest.raises(FeatcacheError, match="both classes"):
        fit_temperature(np.ones(5), np.arange(5.0))
    with pytest.raises(FeatcacheError, match="wrong way round"):
        fit_temperature(np.array([0, 0, 1, 1]), np.array([2.0, 1.0, -1.0, -2.0]))


def _overconfident_head(seed=0, n=600, channels=8, sharpen=12.0):
    """A head whose validation labels follow sigmoid(logit / sharpen): its own probabilities are far too sure."""
    import keras

    keras.utils.set_random_seed(seed)
    models = build_head((3, 3, channels), HeadParams(units=16, dropout=0.3))
    rng = np.random.default_rng(seed)
    pooled = rng.normal(size=(n, channels)).astype(np.float32)
    models.pooled(pooled[:1])
    output = models.pooled.layers[-1]
    output.kernel.assign(np.asarray(output.kernel) * 40)  # a confident head
    logits = head_logits(models.pooled, pooled)
    labels = (rng.uniform(size=n) < _sigmoid(logits / sharpen)).astype(int)
    return models, pooled, labels, logits


def test_temperature_lowers_validation_log_loss_of_an_overconfident_head_and_stays_plain_keras(tmp_path):
    models, pooled, labels, logits = _overconfident_head()
    probs = predict_pooled(models.pooled, pooled)
    assert np.mean(np.abs(probs - 0.5) > 0.45) > 0.5  # most of its answers are above 0.95 or below 0.05
    after, record = calibrate_head("temperature", models, probs, labels, pooled)
    assert record["method"] == "temperature" and record["images"] == len(labels)
    temperature = record["temperature"]
    assert temperature > 3
    assert record["validation_after"]["log_loss"] < record["validation_before"]["log_loss"] - 0.1
    assert record["validation_after"]["ece"] < record["validation_before"]["ece"]
    assert record["validation_before"]["log_loss"] == pytest.approx(binary_cross_entropy(labels, probs))
    # the head itself now computes sigmoid(logit / T), and the returned probabilities are its own
    np.testing.assert_allclose(after, _sigmoid(logits / temperature), atol=2e-6)
    np.testing.assert_array_equal(after, predict_pooled(models.pooled, pooled))
    # the maps head (same layers) saved and reloaded with plain Keras, safe mode, in a fresh interpreter
    maps = np.broadcast_to(pooled[:20, None, None, :], (20, 3, 3, pooled.shape[1])).astype(np.float32)
    models.maps.save(tmp_path / "head.keras")
    np.save(tmp_path / "maps.npy", maps)
    script = ("import json, sys, keras, numpy as np\n"
              "m = keras.saving.load_model(sys.argv[1], safe_mode=True)\n"
              "print(json.dumps({'p': m.predict(np.load(sys.argv[2]), verbose=0)[:, 0].tolist(),"
              " 'layers': [type(l).__name__ for l in m.layers]}))")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "head.keras"), str(tmp_path / "maps.npy")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
                          env={"TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin",
                               "HOME": os.environ.get("HOME", "/tmp")})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["layers"] == ["InputLayer", "GlobalAveragePooling2D", "Dense", "Dropout", "Dense"]  # no new layer
    np.testing.assert_allclose(out["p"], after[:20], atol=1e-5)


def test_isotonic_is_monotone_matches_scikit_learn_and_leaves_the_head_alone():
    from sklearn.isotonic import IsotonicRegression

    models, pooled, labels, _ = _overconfident_head(seed=1)
    probs = predict_pooled(models.pooled, pooled)
    weights = [np.array(w) for w in models.pooled.get_weights()]
    after, record = calibrate_head("isotonic", models, probs, labels, pooled)
    assert after is probs  # the threshold stays on the model's own score
    assert all(np.array_equal(a, b) for a, b in zip(weights, models.pooled.get_weights()))
    x, y = np.array(record["table"]["x"]), np.array(record["table"]["y"])
    assert np.all(np.diff(x) > 0) and np.all(np.diff(y) >= 0) and y.min() >= 0 and y.max() <= 1
    grid = np.linspace(-0.1, 1.1, 500)
    assert np.all(np.diff(apply_isotonic(record["table"], grid)) >= 0)
    reference = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(probs.astype(np.float64), labels)
    np.testing.assert_allclose(apply_isotonic(record["table"], grid), reference.predict(grid), atol=1e-12)
    assert record["validation_after"]["log_loss"] < record["validation_before"]["log_loss"]


def test_unknown_method_is_refused():
    with pytest.raises(FeatcacheError, match="--calibrate must be one of"):
        TrainHeadConfig(calibrate="platt")
    with pytest.raises(FeatcacheError, match="--calibrate must be one of"):
        calibrate_head("platt", None, np.zeros(2), np.array([0, 1]), np.zeros((2, 1)))
    with pytest.raises(FeatcacheError, match="binary heads"):  # a multi-class head's (n, k) probabilities
        calibrate_head("isotonic", None, np.full((3, 3), 1 / 3), np.array([0, 1, 2]), np.zeros((3, 1)))


@pytest.mark.parametrize("method", ["temperature", "isotonic"])
def test_train_head_fits_on_validation_rows_after_the_choice(synthetic_cache, tmp_path, method):
    path = synthetic_cache(separation=6.0)
    plain = train_heads(TrainHeadConfig(cache_dir=tmp_path / "cache", trials=2, **FAST))[0]
    plain_record = load_head_record(path)
    assert "calibration" not in plain_record  # the default changes nothing
    (run_dir_for(path) / "head.json").rename(tmp_path / "plain.json")
    calibrated = train_heads(TrainHeadConfig(cache_dir=tmp_path / "cache", trials=2, calibrate=method, **FAST))[0]
    record = load_head_record(path)
    assert calibrated.best["number"] == plain.best["number"]  # the choice is the same trial
    assert record["calibration"]["method"] == method
    assert record["calibration"]["images"] == 40  # the synthetic cache's validation originals
    # refit the calibration from the saved head's scores on the validation rows alone: the same record
    import keras

    data = load_head_data(path)
    head = keras.saving.load_model(record["head_path"], safe_mode=True)
    scores = head.predict(np.broadcast_to(data.val_pooled[:, None, None, :], (40, 2, 2, 16)), verbose=0)[:, 0]
    if method == "isotonic":
        refit = fit_isotonic(data.val_labels, scores)
        for key in ("x", "y"):
            np.testing.assert_allclose(record["calibration"]["table"][key], refit[key], atol=1e-6)
        assert record["threshold"] == plain_record["threshold"]
    else:
        assert record["val_metrics"]["roc_auc"] == pytest.approx(plain_record["val_metrics"]["roc_auc"])
        assert record["calibration"]["validation_after"]["log_loss"] <= \
            record["calibration"]["validation_before"]["log_loss"] + 1e-12
        assert record["val_metrics"]["loss"] == pytest.approx(record["calibration"]["validation_after"]["log_loss"])
