"""The head: reference shape, pooled/maps equivalence, saving, per-epoch views, fitting, scores, thresholds."""

import h5py
import numpy as np
import pytest

from featcache.errors import FeatcacheError
from featcache.head import (MIN_STEPS_PER_EPOCH, HeadParams, TrainViews, build_head, choose_threshold, class_weights,
                            epoch_rows, fit_head, sample_views, score_probs)


def _trainable(model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


@pytest.mark.parametrize("channels, expected", [(512, 65_793), (2048, 262_401)])  # VGG16, ResNet152 maps
def test_reference_head_parameter_counts(channels, expected):
    models = build_head((7, 7, channels), HeadParams(units=128))
    assert _trainable(models.maps) == expected
    assert _trainable(models.pooled) == expected
    assert [layer.__class__.__name__ for layer in models.maps.layers[1:]] == [
        "GlobalAveragePooling2D", "Dense", "Dropout", "Dense"]


def test_pooled_twin_shares_the_weights_and_computes_the_same_function():
    import keras

    keras.utils.set_random_seed(0)
    models = build_head((7, 7, 32), HeadParams(units=16, dropout=0.3, l2=1e-4))
    assert {id(v) for v in models.pooled.trainable_variables} == {id(v) for v in models.maps.trainable_variables}
    maps = np.random.default_rng(0).normal(size=(20, 7, 7, 32)).astype(np.float32)
    from_maps = models.maps.predict(maps, verbose=0)
    from_pooled = models.pooled.predict(maps.mean(axis=(1, 2)), verbose=0)
    np.testing.assert_allclose(from_maps, from_pooled, rtol=0, atol=1e-6)
    assert from_maps.shape == (20, 1) and np.all((from_maps > 0) & (from_maps < 1))


def test_head_on_cached_float16_maps_matches_cached_pooled_vectors(synthetic_cache):
    import keras

    path = synthetic_cache(feature_shape=(3, 3, 16), dtype="float16")
    keras.utils.set_random_seed(1)
    models = build_head((3, 3, 16), HeadParams(units=8))
    with h5py.File(path, "r") as handle:
        maps, pooled = handle["features"][:64], handle["pooled"][:64]
    assert maps.dtype == np.float16
    np.testing.assert_allclose(models.maps.predict(maps, verbose=0), models.pooled.predict(pooled, verbose=0),
                               rtol=0, atol=1e-3)  # float16 storage rounding only


def test_saved_head_loads_in_safe_mode_without_custom_objects(tmp_path):
    import keras

    keras.utils.set_random_seed(2)
    models = build_head((7, 7, 8), HeadParams(units=4, l2=1e-3))
    models.maps.save(tmp_path / "head.keras")
    loaded = keras.saving.load_model(tmp_path / "head.keras", safe_mode=True)
    maps = np.random.default_rng(1).random((5, 7, 7, 8)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(maps, verbose=0), models.maps.predict(maps, verbose=0))
    assert loaded.input_shape == (None, 7, 7, 8)


def test_sample_views_draws_one_view_per_image_and_all_views_over_epochs():
    source = np.repeat(np.arange(10), [3, 1, 3, 3, 3, 3, 3, 3, 3, 3])  # image 1 has no copies
    rng = np.random.default_rng(0)
    epochs = [sample_views(source, rng) for _ in range(60)]
    for rows in epochs:
        assert sorted(source[rows].tolist()) == list(range(10))
    assert len({tuple(rows) for rows in epochs}) > 1  # shuffled and redrawn every epoch
    assert set(np.concatenate(epochs).tolist()) == set(range(len(source)))
    again = np.random.default_rng(0)
    np.testing.assert_array_equal(sample_views(source, again), epochs[0])


def test_class_weights_are_balanced():
    weights = class_weights(np.array([0, 1, 1, 1]))
    np.testing.assert_allclose(weights, [2.0, 2 / 3])
    assert weights[0] * 1 == pytest.approx(weights[1] * 3)  # each class carries half the total weight


def _separable(rng, n, c=12, copies=2):
    labels = (rng.random(n) > 0.3).astype(np.int64)
    base = 2.0 * np.outer(labels - 0.5, rng.normal(size=c)) + rng.normal(size=(n, c))
    views = np.concatenate([base + (0.3 * rng.normal(size=base.shape) if k else 0) for k in range(copies + 1)])
    return TrainViews(views.astype(np.float32), np.tile(labels, copies + 1), np.tile(np.arange(n), copies + 1))


def _fit(seed=0, **kwargs):
    import keras

    rng = np.random.default_rng(5)
    train, val = _separable(rng, 150), _separable(rng, 60, copies=0)
    params = HeadParams(units=16, batch_size=64, **kwargs.pop("params", {}))
    keras.utils.set_random_seed(seed)
    models = build_head((1, 1, 12), params)
    return fit_head(models, train, val.pooled, val.labels, params, seed=seed, **kwargs), models, val


def test_fit_head_learns_and_restores_the_best_weights():
    result, models, val = _fit(max_epochs=25, patience=3)
    assert result.scores["roc_auc"] >= 0.95
    best = min(h["loss"] for h in result.history)
    assert result.history[result.best_epoch - 1]["loss"] == best
    assert result.scores["loss"] == pytest.approx(best, abs=1e-6)  # restored, not the last epoch's weights
    np.testing.assert_allclose(models.pooled.predict(val.pooled, verbose=0)[:, 0], result.probs, atol=1e-6)
    assert result.epochs == len(result.history) and not result.stopped


def test_fit_head_stops_when_asked_and_is_deterministic():
    seen = []
    stopped, _, _ = _fit(max_epochs=10, on_epoch=lambda epoch, scores: seen.append(epoch) or epoch == 2)
    assert seen == [1, 2] and stopped.epochs == 2 and stopped.stopped
    first, _, _ = _fit(seed=3, max_epochs=4, params={"class_weight": True, "l2": 1e-3})
    second, _, _ = _fit(seed=3, max_epochs=4, params={"class_weight": True, "l2": 1e-3})
    np.testing.assert_array_equal(first.probs, second.probs)
    other, _, _ = _fit(seed=4, max_epochs=4, params={"class_weight": True, "l2": 1e-3})
    assert not np.array_equal(first.probs, other.probs)


def test_score_probs_on_known_scores():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    probs = np.array([0.1, 0.6, 0.2, 0.7, 0.4, 0.9, 0.8])
    scores = score_probs(labels, probs)
    assert scores["roc_auc"] == pytest.approx(11 / 12)  # one of 12 (neg, pos) pairs misordered: 0.6 > 0.4
    assert scores["sensitivity"] == pytest.approx(3 / 4) and scores["specificity"] == pytest.approx(2 / 3)
    assert scores["accuracy"] == pytest.approx(5 / 7)
    expected_loss = -np.mean(np.where(labels == 1, np.log(probs), np.log(1 - probs)))
    assert scores["loss"] == pytest.approx(expected_loss)
    with pytest.raises(FeatcacheError, match="both classes"):
        score_probs(np.ones(3), np.array([0.2, 0.5, 0.9]))


def test_choose_threshold_youden_and_min_sensitivity():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    probs = np.array([0.05, 0.2, 0.35, 0.6, 0.3, 0.55, 0.7, 0.9])
    # Youden's J: at 0.55 sensitivity 3/4, specificity 3/4 (J=0.5); at 0.7 2/4 and 4/4 (J=0.5); at 0.3 4/4, 2/4.
    threshold, method = choose_threshold(labels, probs)
    assert method == "youden" and threshold == pytest.approx(0.7)  # the highest of the tied thresholds
    scores = score_probs(labels, probs, threshold)
    assert scores["sensitivity"] - (1 - scores["specificity"]) == pytest.approx(0.5)
    threshold, method = choose_threshold(labels, probs, min_sensitivity=1.0)
    assert threshold == pytest.approx(0.3) and method == "min_sensitivity=1"
    threshold, _ = choose_threshold(labels, probs, min_sensitivity=0.7)
    assert threshold == pytest.approx(0.55)  # 3/4 >= 0.7 with specificity 3/4, better than 0.3's 2/4


def test_training_step_is_keras_dense_dropout_l2_bce_and_adam():
    """One epoch of fit_head equals the same batches through Keras's own loss, regularizers and Adam."""
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(0)
    train = _separable(rng, 90, copies=0)
    params = HeadParams(units=8, dropout=0.0, learning_rate=3e-3, batch_size=32, l2=1e-3, class_weight=True)
    keras.utils.set_random_seed(0)
    ours = build_head((1, 1, 12), params)
    keras.utils.set_random_seed(0)
    theirs = build_head((1, 1, 12), params)
    initial = ours.pooled.get_weights()
    fit_head(ours, train, train.pooled, train.labels, params, seed=11, max_epochs=1)

    rows = epoch_rows(train.source_index, params.batch_size, np.random.default_rng(11))  # the batches fit_head drew
    assert len(rows) == 3 * 90  # 90 images make 3 batches of 32 a pass: 3 passes reach 8 steps
    optimizer, loss_fn = keras.optimizers.Adam(params.learning_rate), keras.losses.BinaryCrossentropy()
    weights = class_weights(train.labels)[train.labels]
    model = theirs.pooled
    for start in range(0, len(rows), params.batch_size):
        batch = rows[start:start + params.batch_size]
        with tf.GradientTape() as tape:
            loss = loss_fn(train.labels[batch, None].astype("float32"), model(train.pooled[batch], training=True),
                           sample_weight=weights[batch]) + tf.add_n(model.losses)
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    for mine, keras_weight in zip(ours.pooled.get_weights(), model.get_weights()):
        np.testing.assert_allclose(mine, keras_weight, rtol=1e-4, atol=1e-5)
    assert not np.allclose(ours.pooled.get_weights()[0], initial[0])  # it did train


def _stats(channels: int, seed: int = 0):
    from featcache.head import input_stats

    rng = np.random.default_rng(seed)
    return input_stats(100.0 + 1e-3 * rng.normal(size=(50, channels)) * np.arange(1, channels + 1))


def test_input_stats_are_channel_mean_and_variance_in_any_chunking():
    from featcache.head import input_stats

    rng = np.random.default_rng(3)
    pooled = (rng.normal(size=(1000, 6)) * [1e-3, 1, 10, 100, 0, 1] + [0.1, 10, -5, 110, 7, 0]).astype(np.float32)
    whole, chunked = input_stats(pooled), input_stats(pooled, chunk_rows=97)
    np.testing.assert_allclose(whole.mean, pooled.astype(np.float64).mean(axis=0), rtol=1e-6)
    expected_var = pooled.astype(np.float64).var(axis=0)
    expected_var[4] = 1.0  # a constant channel is centred, not divided by ~0 (StandardScaler's rule)
    np.testing.assert_allclose(whole.variance, expected_var, rtol=1e-5)
    np.testing.assert_allclose(chunked.mean, whole.mean, rtol=1e-6)
    np.testing.assert_allclose(chunked.variance, whole.variance, rtol=1e-5)
    assert whole.mean.dtype == np.float32 and whole.variance.dtype == np.float32


def test_standardized_head_is_a_normalization_layer_and_maps_equal_pooled():
    import keras

    keras.utils.set_random_seed(4)
    stats = _stats(16)
    models = build_head((3, 3, 16), HeadParams(units=8, standardize=True), stats)
    assert [layer.__class__.__name__ for layer in models.maps.layers[1:]] == [
        "GlobalAveragePooling2D", "Normalization", "Dense", "Dropout", "Dense"]
    assert _trainable(models.maps) == 16 * 8 + 8 + 8 + 1  # standardization adds no trainable parameter
    rng = np.random.default_rng(5)
    maps = (stats.mean + np.sqrt(stats.variance) * rng.normal(size=(30, 3, 3, 16))).astype(np.float32)
    from_maps = models.maps.predict(maps, verbose=0)
    from_pooled = models.pooled.predict(maps.mean(axis=(1, 2)), verbose=0)
    np.testing.assert_allclose(from_maps, from_pooled, rtol=0, atol=1e-5)
    assert np.std(from_maps) > 1e-3  # the inputs were rescaled: the tiny spread reaches the output
    # The layer computes (x - mean) / sqrt(variance) per channel.
    np.testing.assert_allclose(models.standardize(maps.mean(axis=(1, 2))).numpy(),
                               (maps.mean(axis=(1, 2)) - stats.mean) / np.sqrt(stats.variance), rtol=1e-3, atol=1e-3)


def test_standardized_head_needs_stats_of_its_channels():
    with pytest.raises(FeatcacheError, match="mean and variance of its 16 input channels"):
        build_head((3, 3, 16), HeadParams(standardize=True))
    with pytest.raises(FeatcacheError, match="Received: stats=\\(8,\\)"):
        build_head((3, 3, 16), HeadParams(standardize=True), _stats(8))


def test_standardized_head_loads_in_safe_mode_in_a_fresh_interpreter(tmp_path):
    """No custom objects and no Lambda: a process that never imports featcache loads it in safe mode."""
    import subprocess
    import sys

    import keras

    keras.utils.set_random_seed(6)
    models = build_head((3, 3, 16), HeadParams(units=8, standardize=True), _stats(16))
    models.maps.save(tmp_path / "head.keras")
    maps = np.random.default_rng(7).normal(100.0, 0.01, size=(4, 3, 3, 16)).astype(np.float32)
    np.save(tmp_path / "maps.npy", maps)
    np.save(tmp_path / "expected.npy", models.maps.predict(maps, verbose=0))
    code = ("import sys, numpy as np, keras; d = sys.argv[1]; "
            "assert 'featcache' not in sys.modules; "
            "m = keras.saving.load_model(d + '/head.keras', safe_mode=True); "
            "np.testing.assert_array_equal(m.predict(np.load(d + '/maps.npy'), verbose=0), np.load(d + '/expected.npy')); "
            "print([l.__class__.__name__ for l in m.layers])")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Normalization" in done.stdout


def test_fit_head_with_standardization_learns_badly_scaled_features():
    """Large per-channel offsets and a tiny spread: the reference head barely moves, the standardized one learns."""
    import keras
    from featcache.head import input_stats

    rng = np.random.default_rng(8)
    labels = (rng.random(400) < 0.7).astype(np.int64)
    direction = rng.normal(size=32)
    raw = np.outer(labels - 0.5, direction) + rng.normal(size=(400, 32))
    pooled = (50.0 * np.arange(1, 33) + 1e-3 * raw).astype(np.float32)
    train = TrainViews(pooled[:300], labels[:300], np.arange(300))
    stats = input_stats(train.pooled)
    scores = {}
    for standardize in (False, True):
        params = HeadParams(units=16, standardize=standardize)
        keras.utils.set_random_seed(0)
        models = build_head((1, 1, 32), params, stats)
        scores[standardize] = fit_head(models, train, pooled[300:], labels[300:], params, seed=0, max_epochs=20).scores
    assert scores[True]["roc_auc"] >= 0.95
    assert scores[True]["roc_auc"] > scores[False]["roc_auc"]


def test_an_epoch_is_one_pass_on_large_sets_and_at_least_eight_steps_on_small_ones():
    rng = np.random.default_rng(9)
    large = np.repeat(np.arange(4200), 3)  # 4,200 images, 3 views each: 8.2 batches of 512 a pass
    rows = epoch_rows(large, 512, rng)
    assert len(rows) == 4200 and len(np.unique(large[rows])) == 4200
    small = np.repeat(np.arange(240), 6)  # the dev set's size: one pass is 1 batch of 512
    for batch_size in (64, 512):
        rows = epoch_rows(small, batch_size, rng)
        passes = len(rows) // 240
        assert -(-len(rows) // batch_size) >= MIN_STEPS_PER_EPOCH and len(rows) == passes * 240
        assert (np.bincount(small[rows], minlength=240) == passes).all()  # each pass shows every image once
        assert -(-(passes - 1) * 240 // batch_size) < MIN_STEPS_PER_EPOCH  # and no more passes than needed


def test_class_weighted_trials_stop_on_the_weighted_validation_loss():
    from featcache.head import binary_cross_entropy

    result, _, val = _fit(max_epochs=12, patience=3, params={"class_weight": True})
    stop = [h["stop_loss"] for h in result.history]
    assert result.history[result.best_epoch - 1]["stop_loss"] == min(stop)
    weights = class_weights(val.labels)  # not the training weights, but a check of the weighting itself
    probs = np.linspace(0.1, 0.9, len(val.labels))
    manual = -np.average(np.where(val.labels == 1, np.log(probs), np.log(1 - probs)), weights=weights[val.labels])
    assert binary_cross_entropy(val.labels, probs, weights[val.labels]) == pytest.approx(manual)
    unweighted, _, _ = _fit(max_epochs=12, patience=3)
    assert all(h["stop_loss"] == h["loss"] for h in unweighted.history)
