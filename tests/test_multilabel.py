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


def write_multilabel_cache(cache_dir, n_train: int = 300, n_val: int = 120, n_test: int = 60, copies: int = 1,
                           channels: int = 16, seed: int = 0):
    """A complete synthetic multi-label cache (labels A, B, C; /targets with 20 % masked entries, /labels -1)
    whose pooled vectors add one direction per present label (``separable``), with (1, 1, c) maps."""
    from featcache.cache import FORMAT_VERSION, CachePaths, compute_fingerprint
    from featcache.cachewrite import CacheWriter, FileTable

    splits = np.repeat([0, 1, 2], [n_train, n_val, n_test]).astype(np.uint8)
    base, targets = separable(len(splits), channels=channels, seed=seed)
    paths = [f"p{i:05d}/study1/view1_frontal.jpg" for i in range(len(splits))]
    table = FileTable(path=paths, sha256=[f"{i:064x}" for i in range(len(paths))],
                      label=np.full(len(paths), -1, np.int16), split=splits, patient=[f"p{i}" for i in range(len(paths))])
    rng = np.random.default_rng(seed + 1)
    rows = [(f, k) for f in range(len(table)) for k in range(copies + 1 if splits[f] == 0 else 1)]
    pooled = np.stack([base[f] + (0.1 * rng.normal(size=channels) if k else 0) for f, k in rows]).astype(np.float32)
    fingerprint = compute_fingerprint({"synthetic": "multi-label", "seed": seed, "rows": len(rows)})
    writer = CacheWriter(CachePaths.for_fingerprint(cache_dir, "tiny", fingerprint).final, table, len(rows),
                         (1, 1, channels), "float32", targets=3)
    index = np.array([f for f, _ in rows])
    writer.write_rows(0, pooled[:, None, None, :], pooled, labels=table.label[index], split=splits[index],
                      source_index=index.astype(np.int32), copy_index=np.array([k for _, k in rows], np.int16),
                      targets=targets[index])
    counts = {"train": n_train, "val": n_val, "test": n_test, "train_copies": n_train * copies, "rows": len(rows)}
    return writer.commit({
        "fingerprint": fingerprint, "backbone": "tiny", "class_names": ["A", "B", "C"], "task": "multilabel",
        "image_size": 32, "feature_shape": [1, 1, channels], "dtype": "float32", "format_version": FORMAT_VERSION,
        "counts": counts, "weights": {"source": "random", "sha256": "0" * 64}, "seed": seed,
    })


def test_train_head_on_a_separable_multilabel_cache_streamed_equals_in_memory(tmp_path, monkeypatch):
    """train-head on a synthetic multi-label cache: every label's validation ROC-AUC >= 0.95 for the head and the
    per-label probe, a threshold per label, and streaming within --memory-budget gives the very trials and head."""
    from trainruns import assert_same_training, train_whole_and_streamed

    from featcache import views
    from featcache.tune import format_summary
    from featcache.verify import verify_cache

    def write_verified(folder):
        path = write_multilabel_cache(folder, n_train=800)
        assert verify_cache(path).ok
        return path

    monkeypatch.setattr(views, "SHUFFLE_WINDOW_BYTES", 1024 * 64)
    runs = train_whole_and_streamed(write_verified, tmp_path, streamed_budget=280_000, max_epochs=10)
    whole = runs[0][0]
    assert min(whole.val_metrics["per_label_roc_auc"]) >= 0.95, whole.val_metrics
    assert min(whole.probe.val_scores["per_label_roc_auc"]) >= 0.95 and whole.probe.coef.shape == (3, 16)
    assert len(whole.thresholds) == 3 and whole.majority["roc_auc"] == 0.5
    assert "    A: threshold" in format_summary(whole)
    assert_same_training(*runs)
