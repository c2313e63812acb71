"""Grad-CAM from cached maps: against gradients taken on the reassembled model with tf.GradientTape and by
finite differences; ``featcache explain`` on cached rows (checked end to end) and on new files via an export."""

import json
import shutil

import h5py
import numpy as np
import pytest
from pipeline import dev_pipeline, run_cli

from featcache.assemble import assemble_model, predict_features
from featcache.gradcam import end_to_end_maps, gradcam, head_logit, normalize
from featcache.runs import check_head_matches_cache, load_head_record


@pytest.fixture(scope="module")
def run(tmp_path_factory, dev_data):
    return dev_pipeline(tmp_path_factory, dev_data)


@pytest.fixture(scope="module")
def assembled(run):
    record = load_head_record(run["cache"])
    return assemble_model(run["cache"], record, check_head_matches_cache(record, run["cache"]))


def _test_rows(run, n=8):
    with h5py.File(run["cache"], "r") as handle:
        split, copy = handle["split"][...], handle["copy_index"][...]
        rows = np.flatnonzero((split == 2) & (copy == 0))[:n]
        paths = handle["files/path"].asstr()[...][handle["source_index"][...][rows]]
        return paths.tolist(), handle["features"][rows].astype(np.float32)


def test_gradcam_equals_a_gradient_tape_reference_on_the_reassembled_model(run, assembled):
    """The reference differentiates the end-to-end model's probability with respect to its own intermediate maps
    (one graph, image -> maps -> probability) and divides out the sigmoid's derivative to get the logit's."""
    import keras
    import tensorflow as tf

    from featcache.backbones import build_extractor, get_backbone_spec, load_cached_backbone

    manifest = assembled.manifest
    extractor = build_extractor(get_backbone_spec(manifest["backbone"]), load_cached_backbone(run["cache"], manifest),
                                manifest["image_size"])
    both = keras.Model(extractor.input, [extractor.output, assembled.head(extractor.output)])
    images = np.random.default_rng(0).integers(0, 256, (5, manifest["image_size"], manifest["image_size"], 3),
                                               dtype=np.uint8)
    with tf.GradientTape() as tape:
        maps, prob = both(images, training=False)
        prob = prob[:, 0]
    grads = tape.gradient(prob, maps) / (prob * (1 - prob))[:, None, None, None]  # d logit = d prob / p (1 - p)
    reference = tf.nn.relu(tf.reduce_sum(maps * tf.reduce_mean(grads, axis=(1, 2), keepdims=True), axis=-1)).numpy()
    heatmaps, probs = gradcam(assembled.head, maps.numpy())
    np.testing.assert_allclose(probs, prob.numpy(), rtol=0, atol=1e-6)
    assert reference.max() > 0 and heatmaps.shape == reference.shape == (5, *manifest["feature_shape"][:2])
    np.testing.assert_allclose(heatmaps, reference, rtol=1e-4, atol=1e-5 * reference.max())
    # the end-to-end maps the explain command computes are the ones inside the model
    np.testing.assert_allclose(end_to_end_maps(assembled.model, images), maps.numpy(), rtol=0, atol=1e-5)


def test_the_logit_and_its_gradient_by_finite_differences(run, assembled):
    _, maps = _test_rows(run, 3)
    logit = head_logit(assembled.head)
    values = np.asarray(logit(maps), np.float64)
    np.testing.assert_allclose(1 / (1 + np.exp(-values)), predict_features(assembled.head, maps), rtol=0, atol=1e-6)
    import tensorflow as tf

    x = tf.convert_to_tensor(maps)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = logit(x)
    grads = tape.gradient(y, x).numpy()
    channel = int(np.argmax(np.abs(grads[0]).sum((0, 1))))
    step = 1e-2 * max(1.0, float(np.abs(maps[0, ..., channel]).max()))
    moved = maps.copy()
    moved[0, 0, 0, channel] += step
    numeric = (float(logit(moved)[0]) - float(logit(maps)[0])) / step
    assert numeric == pytest.approx(grads[0, 0, 0, channel], rel=2e-2, abs=1e-5)


def test_explain_cached_rows_writes_overlays_and_agrees_end_to_end(run, assembled, tmp_path):
    out = tmp_path / "explain"
    result = run_cli("explain", "--cache-dir", run["cache_dir"], "--limit", "6", "--out", out)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "heatmaps.json").read_text())
    paths, maps = _test_rows(run, 6)
    assert [image["path"] for image in doc["images"]] == paths
    np.testing.assert_allclose([image["probability"] for image in doc["images"]],
                               predict_features(assembled.head, maps), rtol=0, atol=1e-6)
    heatmaps, _ = gradcam(assembled.head, maps)
    np.testing.assert_allclose([image["heatmap"] for image in doc["images"]], heatmaps, rtol=0, atol=1e-5)
    agreement = doc["agreement"]
    assert agreement["images"] == 6 and agreement["max_abs_diff"] <= agreement["tolerance"]
    assert agreement["storage_max_abs_diff"] is not None and "max |diff|" in result.output
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 6 and all(p.stat().st_size > 1000 for p in pngs)


def test_explain_files_through_the_export_matches_predict_and_the_cache(run, tmp_path):
    paths, maps = _test_rows(run, 3)
    files = [run["data"] / p for p in paths]
    result = run_cli("explain", *files, "--model", run["model"], "--out", tmp_path / "x", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    predicted = json.loads(run_cli("predict", *files, "--model", run["model"], "--json", "--no-progress").output)
    np.testing.assert_allclose([i["probability"] for i in doc["images"]],
                               [p["probability"] for p in predicted["predictions"]], rtol=0, atol=1e-6)
    assert [i["predicted"] for i in doc["images"]] == [p["label"] for p in predicted["predictions"]]
    cached = json.loads(run_cli("explain", "--cache-dir", run["cache_dir"], "--limit", "3", "--json",
                                "--out", tmp_path / "c").output)
    for new, old in zip(doc["images"], cached["images"]):  # float32 end to end against float16 cached maps
        assert np.abs(normalize(np.array(new["heatmap"])) - normalize(np.array(old["heatmap"]))).max() < 0.05


def test_a_changed_raw_image_fails_the_check_in_one_line(run, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(run["data"], data)
    paths, _ = _test_rows(run, 2)
    (data / paths[0]).write_bytes((data / paths[1]).read_bytes())  # another X-ray under the first one's name
    result = run_cli("explain", "--cache-dir", run["cache_dir"], "--limit", "2", "--data", data, "--out", tmp_path / "x")
    assert result.exit_code == 1 and "differs from the end-to-end one" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["some.jpeg"], "needs --model"),
    (["--split", "holdout"], "--split must be one of"),
])
def test_bad_explain_arguments_are_one_line(run, tmp_path, args, message):
    result = run_cli("explain", *args, "--cache-dir", run["cache_dir"], "--out", tmp_path / "x")
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_the_heatmap_peaks_where_the_class_signal_is(tmp_path):
    """Synthetic X-rays whose positive class is bright blobs in the top-right quadrant, through the tiny backbone
    at 224 px (7 x 7 maps) and a head trained on the pooled vectors: Grad-CAM must put the peak there."""
    import keras

    from featcache.backbones import build_extractor, get_backbone_spec, load_backbone
    from featcache.head import HeadParams, TrainViews, build_head, fit_head, input_stats

    rng = np.random.default_rng(0)
    n, size = 96, 224
    labels = np.tile([0, 1], n // 2)
    images = rng.normal(110, 12, size=(n, size, size, 1))
    yy, xx = np.mgrid[0:size, 0:size]
    for i in np.flatnonzero(labels):
        for _ in range(3):  # blobs centred inside the top-right quadrant (rows < 112, columns >= 112)
            cy, cx = rng.integers(16, 96), rng.integers(128, 208)
            images[i, :, :, 0] += 90 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 10.0 ** 2))
    images = np.repeat(np.clip(images, 0, 255).astype(np.uint8), 3, axis=-1)
    spec = get_backbone_spec("tiny")
    extractor = build_extractor(spec, load_backbone(spec, size, "random", 0), size)
    maps = extractor.predict(images, verbose=0).astype(np.float32)
    assert maps.shape[1:3] == (7, 7)
    pooled = maps.mean(axis=(1, 2))
    train, test = np.arange(n) < 64, np.arange(n) >= 64
    params = HeadParams(standardize=True, dropout=0.0)
    keras.utils.set_random_seed(0)
    models = build_head(maps.shape[1:], params, input_stats(pooled[train]))
    views = TrainViews(pooled[train], labels[train], np.arange(train.sum()))
    result = fit_head(models, views, pooled[test], labels[test], params, seed=0, max_epochs=40, patience=40)
    assert result.scores["roc_auc"] >= 0.95  # the head found the blobs
    heatmaps, _ = gradcam(models.maps, maps[test & (labels == 1)])
    rows, cols = np.unravel_index(heatmaps.reshape(len(heatmaps), -1).argmax(axis=1), (7, 7))
    in_quadrant = (rows <= 3) & (cols >= 3)  # the 7 x 7 cells over the top-right quadrant (the middle row/column shared)
    assert in_quadrant.mean() >= 0.9, list(zip(rows.tolist(), cols.tolist()))
    top_right = heatmaps[:, :3, 4:].sum(axis=(1, 2))
    bottom_left = heatmaps[:, 4:, :3].sum(axis=(1, 2))
    assert np.all(top_right > bottom_left)
