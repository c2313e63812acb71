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


def three_class_tree(dev_data, target, train: int = 16, test: int = 6):
    """NORMAL, BACTERIA, VIRUS class folders from the dev X-rays (Kermany's pneumonia file names say which)."""
    import shutil

    pneumonia = {"BACTERIA": "_bacteria_", "VIRUS": "_virus_"}
    for split, count in (("train", train), ("test", test)):
        sources = {"NORMAL": sorted((dev_data / split / "NORMAL").iterdir())[:count]}
        for name, marker in pneumonia.items():
            sources[name] = [f for f in sorted((dev_data / split / "PNEUMONIA").iterdir()) if marker in f.name][:count]
        for name, files in sources.items():
            (target / split / name).mkdir(parents=True)
            for file in files:
                shutil.copyfile(file, target / split / name / file.name)
    return target


def test_three_class_folders_end_to_end(tmp_path, dev_data):
    """extract -> train-head -> evaluate -> export -> predict on three class folders, each carrying 3 classes."""
    import json

    import keras

    from tests.pipeline import FAST, run_cli

    data, cache_dir, model = three_class_tree(dev_data, tmp_path / "xrays"), tmp_path / "cache", tmp_path / "model"
    names = ["BACTERIA", "NORMAL", "VIRUS"]
    for args in (["extract", "--data", data, "--cache-dir", cache_dir, *FAST],
                 ["train-head", "--cache-dir", cache_dir, "--trials", "2", "--no-progress"],
                 ["evaluate", "--no-progress", "--cache-dir", cache_dir, "--bootstrap", "50"],
                 ["export", "--cache-dir", cache_dir, "--out", model]):
        result = run_cli(*args)
        assert result.exit_code == 0, f"{args[0]}: {result.output} {result.exception!r}"
        if args[0] in ("train-head", "export"):  # no meaningless "threshold 0.0000" line
            assert "argmax" in result.output and "threshold 0.0000" not in result.output, result.output
    run_dir = next((cache_dir / "runs").glob("tiny-*"))
    record = json.loads((run_dir / "head.json").read_text())
    assert record["class_names"] == names and record["threshold_method"] == "argmax"
    head = keras.saving.load_model(run_dir / "head.keras", safe_mode=True)
    assert head.output_shape == (None, 3)
    probe = json.loads((run_dir / "probe.json").read_text())
    assert "multinomial" in probe["kind"] and np.shape(probe["coef"])[0] == 3

    report = json.loads((run_dir / "report.json").read_text())
    assert report["task"] == "multiclass" and report["class_names"] == names
    assert set(report["at_threshold"]["per_class"]) == set(names)
    matrix = np.array(report["at_threshold"]["confusion"]["matrix"])
    assert matrix.shape == (3, 3) and matrix.sum() == report["test"]["images"] == 18
    probs = np.array(report["predictions"]["probability"])
    assert probs.shape == (18, 3)
    accuracy = np.mean(probs.argmax(1) == np.array(report["predictions"]["label"]))
    assert report["at_threshold"]["metrics"]["accuracy"]["value"] == pytest.approx(accuracy)
    assert report["parity"]["max_abs_diff"] <= report["parity"]["tolerance"]
    assert (run_dir / "confusion.png").is_file() and "VIRUS" in (run_dir / "report.md").read_text()

    card = json.loads((model / "model.json").read_text())
    assert card["class_names"] == names and card["task"] == "multiclass" and set(card["test_per_class"]) == set(names)
    exported = keras.saving.load_model(model / "model.keras", safe_mode=True)
    assert exported.output_shape == (None, 3)
    assert all(name in (model / "MODEL_CARD.md").read_text() for name in names)
    assert card["verification"]["max_abs_diff_saved_model"] <= card["verification"]["tolerance"]

    result = run_cli("verify", model)
    assert result.exit_code == 0 and "output (None, 3)" in result.output, result.output

    result = run_cli("explain", "--model", model, "--out", tmp_path / "explain", data / "test" / "VIRUS")
    assert result.exit_code == 0 and result.output.count("heatmap of") == 6, result.output  # the predicted class's

    result = run_cli("predict", "--no-progress", "--model", model, "--json", data / "test" / "VIRUS")
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.stdout)["predictions"]
    assert len(predictions) == 6
    for p in predictions:
        assert set(p["probabilities"]) == set(names) and sum(p["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)


def test_label_file_with_three_class_names(tmp_path, dev_data):
    """A single label column of three class names: extract takes it and train-head fits a 3-way softmax head."""
    import json

    import keras

    from tests.pipeline import FAST, run_cli

    data = three_class_tree(dev_data, tmp_path / "xrays", train=10, test=3)
    rows = ["path,finding,split"] + [f"{p.relative_to(data).as_posix()},{p.parent.name.lower()},"
                                     f"{'test' if p.parts[-3] == 'test' else ''}"
                                     for p in sorted(data.rglob("*.jpeg"))]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cache_dir = tmp_path / "cache"
    for args in (["extract", "--data", data, "--labels", tmp_path / "labels.csv", "--cache-dir", cache_dir, *FAST],
                 ["train-head", "--cache-dir", cache_dir, "--trials", "1", "--no-progress"]):
        result = run_cli(*args)
        assert result.exit_code == 0, f"{args[0]}: {result.output} {result.exception!r}"
    run_dir = next((cache_dir / "runs").glob("tiny-*"))
    record = json.loads((run_dir / "head.json").read_text())
    assert record["class_names"] == ["bacteria", "normal", "virus"] and record["threshold_method"] == "argmax"
    assert keras.saving.load_model(run_dir / "head.keras", safe_mode=True).output_shape == (None, 3)


def test_multiclass_intervals_match_scikit_learn_per_resample():
    from sklearn.metrics import confusion_matrix, recall_score, roc_auc_score

    from featcache.metrics import bootstrap_indices
    from featcache.multiclass_eval import bootstrap_samples, score_multiclass_with_intervals

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 80)
    probs = rng.dirichlet(np.ones(3), size=80)
    probs[np.arange(80), labels] += 0.4
    probs /= probs.sum(axis=1, keepdims=True)
    names = ["a", "b", "c"]
    scored = score_multiclass_with_intervals(labels, probs, names, n_bootstrap=200, seed=0)
    for k, name in enumerate(names):
        entry = scored["per_class"][name]
        assert entry["roc_auc"]["value"] == pytest.approx(roc_auc_score(labels == k, probs[:, k]))
        assert entry["roc_auc"]["ci_low"] <= entry["roc_auc"]["value"] <= entry["roc_auc"]["ci_high"]
        assert entry["images"] == int(np.sum(labels == k))
    assert scored["metrics"]["sensitivity"]["value"] == pytest.approx(
        recall_score(labels, probs.argmax(1), average="macro"))
    assert scored["confusion"]["matrix"] == confusion_matrix(labels, probs.argmax(1)).tolist()
    indices = bootstrap_indices(80, 3, seed=7)
    samples = bootstrap_samples(labels, probs, indices)
    for b, rows in enumerate(indices):
        expected = roc_auc_score(labels[rows], probs[rows], multi_class="ovr", average="macro")
        assert samples["roc_auc"][b] == pytest.approx(expected)
        assert samples["accuracy"][b] == pytest.approx(np.mean(probs[rows].argmax(1) == labels[rows]))


def write_three_class_cache(cache_dir, n_train: int = 300, n_val: int = 600, n_test: int = 30, copies: int = 2,
                            channels: int = 16, seed: int = 0):
    """A complete synthetic cache of classes A, B, C (as ``conftest.write_synthetic_cache``), each class's pooled
    vectors shifted along its own direction, with (1, 1, c) maps whose mean is the vector."""
    from featcache.cache import FORMAT_VERSION, CachePaths, compute_fingerprint
    from featcache.cachewrite import CacheWriter, FileTable

    rng = np.random.default_rng(seed)
    splits = np.repeat([0, 1, 2], [n_train, n_val, n_test]).astype(np.uint8)
    labels = (np.arange(len(splits)) % 3).astype(np.int16)
    names = ("A", "B", "C")
    folder = {0: "train", 1: "train", 2: "test"}
    paths = [f"{folder[s]}/{names[y]}/img{i:05d}.jpeg" for i, (s, y) in enumerate(zip(splits, labels))]
    order = np.argsort(paths, kind="stable")
    table = FileTable(path=[paths[i] for i in order], sha256=[f"{i:064x}" for i in order], label=labels[order],
                      split=splits[order], patient=[f"p{i}" for i in order])
    directions = rng.normal(size=(3, channels)).astype(np.float32)
    base = 1.5 * directions[table.label] + rng.normal(size=(len(table), channels))
    rows = [(f, k) for f in range(len(table)) for k in range(copies + 1 if table.split[f] == 0 else 1)]
    pooled = np.stack([base[f] + (0.3 * rng.normal(size=channels) if k else 0) for f, k in rows]).astype(np.float32)
    settings = {"synthetic": "three classes", "seed": seed, "rows": len(rows), "channels": channels}
    fingerprint = compute_fingerprint(settings)
    writer = CacheWriter(CachePaths.for_fingerprint(cache_dir, "tiny", fingerprint).final, table, len(rows),
                         (1, 1, channels), "float32")
    index = np.array([f for f, _ in rows])
    writer.write_rows(0, pooled[:, None, None, :], pooled, labels=table.label[index], split=table.split[index],
                      source_index=index.astype(np.int32), copy_index=np.array([k for _, k in rows], np.int16))
    counts = {"train": n_train, "val": n_val, "test": n_test, "train_copies": n_train * copies, "rows": len(rows)}
    return writer.commit({
        "fingerprint": fingerprint, "backbone": "tiny", "class_names": list(names), "image_size": 32,
        "feature_shape": [1, 1, channels], "dtype": "float32", "format_version": FORMAT_VERSION, "counts": counts,
        "weights": {"source": "random", "sha256": "0" * 64}, "seed": seed,
    })


def test_train_head_on_a_three_class_cache_streamed_equals_in_memory(tmp_path, monkeypatch):
    """train-head on a 3-class cache: the softmax head and the multinomial probe learn it, and streaming the
    training views within --memory-budget gives the very trials and head of the in-memory run."""
    from trainruns import assert_same_training, train_whole_and_streamed

    from featcache import views

    monkeypatch.setattr(views, "SHUFFLE_WINDOW_BYTES", 1024 * 64)  # a window per /pooled chunk of 1,024 rows
    runs = train_whole_and_streamed(write_three_class_cache, tmp_path, streamed_budget=270_000, max_epochs=8)
    whole = runs[0][0]
    assert whole.threshold_method == "argmax" and whole.val_metrics["roc_auc"] >= 0.95, whole.val_metrics
    assert whole.probe.val_scores["roc_auc"] >= 0.95 and whole.probe.coef.shape == (3, 16)
    assert_same_training(*runs)
