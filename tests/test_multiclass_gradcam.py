"""Grad-CAM of a multi-class (softmax) head: the heatmap of class k's logit, checked against gradients taken
independently through the pooled vector, and on synthetic images where two classes' signals sit in different
quadrants of the same image."""

import numpy as np
import pytest

from featcache.gradcam import gradcam
from featcache.head import HeadParams, TrainViews, build_head, fit_head, input_stats


def _random_softmax_head(channels=6, classes=4, seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    models = build_head((3, 3, channels), HeadParams(units=12, dropout=0.4), classes=classes)
    models.maps(np.zeros((1, 3, 3, channels), np.float32))
    return models


def test_gradcam_of_each_class_equals_a_reference_through_the_pooled_vector():
    """Through the global average pool, d z_k / d A[i, j, :] = (1 / hw) d z_k / d pooled, the same at every cell: the
    channel weights are that gradient. Taken here on the pooled twin's own layers, one class at a time."""
    import tensorflow as tf

    models = _random_softmax_head()
    rng = np.random.default_rng(1)
    maps = np.maximum(rng.normal(size=(5, 3, 3, 6)), 0).astype(np.float32)
    pooled = tf.convert_to_tensor(maps.mean(axis=(1, 2)))
    last = models.pooled.layers[-1]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(pooled)
        x = pooled
        for layer in models.pooled.layers[1:-1]:
            x = layer(x, training=False)
        logits = tf.matmul(x, last.kernel) + last.bias  # (5, 4)
        chosen = [logits[:, k] for k in range(4)]
    heatmaps = []
    for k in range(4):
        alpha = tape.gradient(chosen[k], pooled).numpy() / 9.0
        reference = np.maximum(np.einsum("bhwc,bc->bhw", maps, alpha), 0)
        cams, probs = gradcam(models.maps, maps, target=k)
        np.testing.assert_allclose(cams, reference, rtol=1e-5, atol=1e-6)
        heatmaps.append(cams)
    np.testing.assert_allclose(probs, models.maps.predict(maps, verbose=0), atol=1e-6)
    assert probs.shape == (5, 4)
    # the default explains each image's predicted class; per-image targets pick per image
    predicted = probs.argmax(axis=1)
    default, _ = gradcam(models.maps, maps)
    np.testing.assert_allclose(default, np.stack([heatmaps[k][i] for i, k in enumerate(predicted)]), atol=1e-6)
    mixed, _ = gradcam(models.maps, maps, target=np.array([0, 1, 2, 3, 0]), batch_size=2)
    np.testing.assert_allclose(mixed, np.stack([heatmaps[k][i] for i, k in enumerate([0, 1, 2, 3, 0])]), atol=1e-6)
    assert not np.allclose(heatmaps[0], heatmaps[1])  # a map per class


def _blob_images(rng, n, size, where, amplitude, base=None):
    yy, xx = np.mgrid[0:size, 0:size]
    images = rng.normal(110, 12, size=(n, size, size)) if base is None else base.copy()
    half = size // 2
    for i in range(n):
        for _ in range(2):
            cy = where[0] * half + rng.integers(half // 4, 3 * half // 4)
            cx = where[1] * half + rng.integers(half // 4, 3 * half // 4)
            images[i] += amplitude * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 16) ** 2))
    return images


def test_the_class_heatmap_lights_that_class_signal_in_an_image_holding_two():
    """Three classes of synthetic images: bright blobs in the top-right quadrant (A), dark blobs in the bottom-left
    one (B), none (C), through the tiny backbone at 128 px (4 x 4 maps) and a softmax head trained on the pooled
    vectors. On test images holding both A's and B's blobs, the heatmap of A must peak top-right and that of B
    bottom-left: the map follows the class asked for."""
    import keras

    from featcache.backbones import build_extractor, get_backbone_spec, load_backbone

    rng = np.random.default_rng(0)
    n, size = 40, 128
    signals = {0: ((0, 1), 130.0), 1: ((1, 0), -110.0)}
    parts = [_blob_images(rng, n, size, *signals[0]), _blob_images(rng, n, size, *signals[1]),
             rng.normal(110, 12, size=(n, size, size))]
    both = _blob_images(rng, 16, size, *signals[1], base=_blob_images(rng, 16, size, *signals[0]))
    images = np.concatenate(parts + [both])
    images = np.repeat(np.clip(images, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    labels = np.repeat([0, 1, 2], n)
    spec = get_backbone_spec("tiny")
    extractor = build_extractor(spec, load_backbone(spec, size, "random", 0), size)
    maps = extractor.predict(images, verbose=0).astype(np.float32)
    assert maps.shape[1:3] == (4, 4)
    pooled = maps.mean(axis=(1, 2))
    train = np.arange(3 * n) % 4 != 0
    val = ~train
    params = HeadParams(standardize=True, dropout=0.0, units=32)
    keras.utils.set_random_seed(0)
    models = build_head(maps.shape[1:], params, input_stats(pooled[:3 * n][train]), classes=3)
    views = TrainViews(pooled[:3 * n][train], labels[train], np.arange(train.sum()))
    result = fit_head(models, views, pooled[:3 * n][val], labels[val], params, seed=0, max_epochs=60, patience=60)
    assert result.scores["roc_auc"] >= 0.95, result.scores  # the head tells the three apart
    composite = maps[3 * n:]
    top_right = (slice(0, 2), slice(2, 4))
    bottom_left = (slice(2, 4), slice(0, 2))
    cam_a, _ = gradcam(models.maps, composite, target=0)
    cam_b, _ = gradcam(models.maps, composite, target=1)

    def share(cams, region):  # the part of each heatmap inside a quadrant
        return cams[:, region[0], region[1]].sum(axis=(1, 2)) / np.maximum(cams.sum(axis=(1, 2)), 1e-12)

    assert np.mean(share(cam_a, top_right) > share(cam_a, bottom_left)) >= 0.9, (share(cam_a, top_right),
                                                                                  share(cam_a, bottom_left))
    assert np.mean(share(cam_b, bottom_left) > share(cam_b, top_right)) >= 0.9, (share(cam_b, bottom_left),
                                                                                  share(cam_b, top_right))


def test_class_names_for_explain():
    from featcache.errors import FeatcacheError
    from featcache.explain import class_target

    assert class_target(["A", "B", "C"], None, "x") is None  # each image's predicted class
    assert class_target(["A", "B", "C"], "C", "x") == 2
    assert class_target(["NORMAL", "PNEUMONIA"], "PNEUMONIA", "x") is None  # a binary head: its positive class
    with pytest.raises(FeatcacheError, match="--class must be one of A, B, C"):
        class_target(["A", "B", "C"], "D", "x")
    with pytest.raises(FeatcacheError, match="binary head's heatmap is of its positive class 'PNEUMONIA'"):
        class_target(["NORMAL", "PNEUMONIA"], "NORMAL", "x")
