"""Multi-label end to end (issue 8 part 4): a CheXpert-like nested tree with a CSV of three 0/1 labels with
uncertain values -> extract (/targets, NaN masked) -> train-head -> evaluate -> export -> predict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from datasets import write_csv
from pipeline import run_cli

LABELS = ("Pneumonia", "Opacity", "Edema")
FAST = ["--backbone", "tiny", "--weights", "random", "--image-size", "32", "--augment-copies", "1", "--no-progress"]


def multilabel_tree(dev_data: Path, root: Path, train_patients: int = 12, test_patients: int = 4) -> Path:
    """``patientNNNNN/study{1,2}/view1_frontal.jpg`` (two studies per patient, one dev class per patient) and
    ``labels.csv``: Pneumonia is the dev class, Opacity the dev class with one row in five flipped, Edema 1/0/-1/
    blank in turn (noise, uncertain and blank); a few Pneumonia and Opacity values are -1 or blank too. Test
    patients carry split 'test', the others none (extract draws validation from them)."""
    rows, number = [], 0
    for split, per_class in (("train", train_patients), ("test", test_patients)):
        for label, name in enumerate(("NORMAL", "PNEUMONIA")):
            sources = sorted((dev_data / split / name).iterdir())[:2 * per_class]
            for i in range(per_class):
                number += 1
                for study, source in enumerate(sources[2 * i:2 * i + 2], start=1):
                    relative = f"patient{number:05d}/study{study}/view1_frontal.jpg"
                    (root / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, root / relative)
                    k = len(rows)
                    rows.append({"path": relative, "Pneumonia": str(label),
                                 "Opacity": str(1 - label if k % 5 == 4 else label),
                                 "Edema": ("1", "0", "-1", "")[k % 4], "split": "test" if split == "test" else ""})
    rows[0]["Pneumonia"], rows[2]["Opacity"], rows[5]["Pneumonia"] = "-1", "", ""
    return write_csv(root / "labels.csv", rows)


def expected_targets(csv_path: Path, policy: str = "ignore") -> dict[str, list[float]]:
    import csv

    resolve = {"ignore": np.nan, "zero": 0.0, "one": 1.0}[policy]
    with open(csv_path, newline="") as handle:
        return {r["path"]: [resolve if r[c] in ("", "-1") else float(r[c]) for c in LABELS]
                for r in csv.DictReader(handle)}


def only_cache(cache_dir: Path) -> Path:
    return next(p for p in sorted(cache_dir.glob("tiny-*.h5")) if not p.name.endswith(".weights.h5"))


@pytest.fixture(scope="module")
def tree(dev_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlabel") / "data"
    return root, multilabel_tree(dev_data, root)


def test_extract_stores_masked_targets_for_every_row(tree, tmp_path):
    from featcache.cache import is_multilabel, load_pooled, read_manifest
    from featcache.verify import verify_cache

    root, csv_path = tree
    result = run_cli("extract", "--data", root, "--labels", csv_path, "--cache-dir", tmp_path / "c",
                     "--shard-rows", "16", *FAST)
    assert result.exit_code == 0, result.output
    assert "patients: 32 patients in 64 images" in result.output
    cache = only_cache(tmp_path / "c")
    manifest = read_manifest(cache)
    assert is_multilabel(manifest) and manifest["class_names"] == list(LABELS)
    assert manifest["labels"]["kind"] == "multilabel" and manifest["labels"]["uncertain"] == "ignore"
    assert len(manifest["shards"]) > 1  # /targets sits in the master over several shards
    data = load_pooled(cache)
    with h5py.File(cache, "r") as handle:
        paths = handle["files/path"].asstr()[...]
        assert (handle["labels"][...] == -1).all() and (handle["files/label"][...] == -1).all()
    wanted = expected_targets(csv_path)
    expected = np.array([wanted[paths[s]] for s in data.source_index], np.float32)
    assert data.targets.shape == (len(data.labels), 3) and data.targets.dtype == np.float32
    np.testing.assert_array_equal(data.targets, expected)  # copies carry their original's targets, NaN where masked
    assert np.isnan(data.targets).any()
    assert verify_cache(cache).ok
    assert run_cli("compact", cache).exit_code == 0  # one plain file: /targets copied and checked
    np.testing.assert_array_equal(load_pooled(cache).targets, expected)
    assert verify_cache(cache).ok
    info = run_cli("info", cache)
    assert "labels (multi-label) ['Pneumonia', 'Opacity', 'Edema']" in info.output


def test_uncertain_policy_is_in_the_fingerprint_and_the_targets(tree, tmp_path):
    from featcache.cache import load_pooled

    root, csv_path = tree
    args = ["extract", "--data", root, "--labels", csv_path, "--cache-dir", tmp_path / "c", *FAST,
            "--augment-copies", "0"]
    assert run_cli(*args).exit_code == 0
    assert run_cli(*args, "--uncertain", "one").exit_code == 0
    caches = [p for p in sorted((tmp_path / "c").glob("tiny-*.h5")) if not p.name.endswith(".weights.h5")]
    assert len(caches) == 2
    by_policy = {}
    for cache in caches:
        data = load_pooled(cache)
        by_policy[data.manifest["labels"]["uncertain"]] = data
    one = by_policy["one"]
    assert not np.isnan(one.targets).any()
    assert by_policy["ignore"].manifest["fingerprint"] != one.manifest["fingerprint"]
    masked = np.isnan(by_policy["ignore"].targets)
    assert masked.any() and (one.targets[masked] == 1).all()


def test_a_binary_cache_has_no_targets_and_damaged_targets_are_refused(tree, tmp_path):
    from featcache.cache import is_multilabel, open_cache, read_manifest
    from featcache.errors import DamagedFileError
    from featcache.verify import verify_cache

    root, csv_path = tree
    base = ["extract", "--data", root, "--labels", csv_path, *FAST, "--augment-copies", "0"]
    assert run_cli(*base, "--label-columns", "Pneumonia", "--cache-dir", tmp_path / "b").exit_code == 0
    binary = only_cache(tmp_path / "b")
    manifest = read_manifest(binary)
    assert "targets" not in manifest["datasets"] and not is_multilabel(manifest) and "task" not in manifest
    with h5py.File(binary, "r") as handle:
        assert "targets" not in handle
    assert run_cli(*base, "--cache-dir", tmp_path / "m").exit_code == 0
    cache = only_cache(tmp_path / "m")
    with h5py.File(cache, "r+") as handle:
        values = handle["targets"][...]
        row, col = np.argwhere(np.isfinite(values))[0]
        handle["targets"][row, col] = 1 - values[row, col]  # still 0/1: only the SHA-256 can tell
    assert not verify_cache(cache).ok
    from featcache.checksums import read_checked

    with open_cache(cache) as handle, pytest.raises(DamagedFileError, match="targets"):
        read_checked(handle, "targets", read_checked(handle, "split"))


def test_a_label_without_both_values_in_a_split_is_one_line(tree, tmp_path):
    import csv

    root, csv_path = tree
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        if row["split"] == "test":
            row["Edema"] = "0" if row["Edema"] == "1" else row["Edema"]
    edited = write_csv(tmp_path / "edited.csv", rows)
    result = run_cli("extract", "--data", root, "--labels", edited, "--cache-dir", tmp_path / "c", *FAST)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "Label 'Edema'" in result.output and "test split" in result.output
    for row in rows:
        row["Opacity"] = "1"
    result = run_cli("extract", "--data", root, "--labels", write_csv(tmp_path / "one.csv", rows),
                     "--cache-dir", tmp_path / "c", *FAST)
    assert result.exit_code == 1 and "single value" in result.output, result.output
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("*.h5"))


@pytest.fixture(scope="module")
def run(tree, tmp_path_factory):
    """extract -> train-head --trials 2 -> evaluate -> export on the tree, once for the module."""
    root, csv_path = tree
    base = tmp_path_factory.mktemp("mlabel-run")
    cache_dir, model = base / "cache", base / "model"
    outputs = {}
    for name, args in (
        ("extract", ["extract", "--data", root, "--labels", csv_path, "--cache-dir", cache_dir, *FAST]),
        ("train-head", ["train-head", "--cache-dir", cache_dir, "--trials", "2", "--no-progress"]),
        ("evaluate", ["evaluate", "--cache-dir", cache_dir, "--bootstrap", "200", "--no-progress"]),
        ("export", ["export", "--cache-dir", cache_dir, "--out", model]),
        ("predict", ["predict", "--no-progress", root / "patient00025", "--model", model, "--json"]),
    ):
        result = run_cli(*args)
        assert result.exit_code == 0, f"{name}: {result.output} {result.exception!r}"
        outputs[name] = result.stdout if name == "predict" else result.output
    cache = only_cache(cache_dir)
    return {"root": root, "csv": csv_path, "cache_dir": cache_dir, "cache": cache, "model": model,
            "run_dir": cache_dir / "runs" / cache.stem, "outputs": outputs}


def test_train_head_saves_a_sigmoid_head_with_a_threshold_per_label_and_both_floors(run):
    import keras

    out = run["outputs"]["train-head"]
    assert "per-label thresholds (per label youden): val macro ROC-AUC" in out, out
    for name in LABELS:
        assert f"    {name}: threshold " in out
    assert "floor: linear probe (standardized logistic regression per label" in out
    assert "floor: majority (each label's training majority) val macro accuracy" in out
    record = json.loads((run["run_dir"] / "head.json").read_text())
    assert record["task"] == "multilabel" and record["class_names"] == list(LABELS)
    assert len(record["thresholds"]) == 3 and all(0 < t <= 1 for t in record["thresholds"])
    assert record["threshold_method"] == "per label youden" and len(record["val_metrics"]["per_label_roc_auc"]) == 3
    probe = json.loads((run["run_dir"] / "probe.json").read_text())
    assert probe["kind"].endswith("per label") and np.shape(probe["coef"])[0] == 3
    head = keras.saving.load_model(run["run_dir"] / "head.keras", safe_mode=True)
    assert head.output_shape == (None, 3) and head.layers[-1].activation.__name__ == "sigmoid"


def test_train_head_refuses_calibration_of_a_multilabel_head_in_one_line(run):
    result = run_cli("train-head", "--cache", run["cache"], "--trials", "2", "--calibrate", "temperature",
                     "--no-progress")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "multi-label head" in result.output


def test_the_probe_floor_ignores_masked_targets():
    """The per-label probe is fitted on each label's unmasked rows only: with the standardization fixed, changing
    the features of rows whose every target is masked changes nothing (were NaN read as 0 or 1, it would)."""
    from featcache.head import input_stats
    from featcache.multilabel import fit_multilabel_probe

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    targets = np.stack([(x[:, 0] > 0), (x[:, 1] > 0)], 1).astype(np.float32)
    val_x = rng.normal(size=(80, 4)).astype(np.float32)
    val = np.stack([(val_x[:, 0] > 0), (val_x[:, 1] > 0)], 1).astype(np.float32)
    targets[:60] = np.nan
    stats = input_stats(x)
    probe = fit_multilabel_probe(x.copy(), targets, val_x, val, stats, (1.0,), 500)
    moved = x.copy()
    moved[:60] = rng.normal(size=(60, 4)) * 10
    again = fit_multilabel_probe(moved, targets, val_x, val, stats, (1.0,), 500)
    np.testing.assert_array_equal(probe.coef, again.coef)
    filled = fit_multilabel_probe(moved, np.nan_to_num(targets), val_x, val, stats, (1.0,), 500)
    assert not np.allclose(filled.coef, probe.coef)  # the check above can fail: counted rows do change the fit
    assert min(probe.val_scores["per_label_roc_auc"]) > 0.95


def test_evaluate_reports_every_label_with_intervals_and_draws_a_roc_curve_per_label(run):
    out = run["outputs"]["evaluate"]
    assert "3 labels, per-label thresholds (macro): accuracy" in out, out
    report = json.loads((run["run_dir"] / "report.json").read_text())
    head = json.loads((run["run_dir"] / "head.json").read_text())
    assert report["task"] == "multilabel" and report["class_names"] == list(LABELS)
    assert report["at_threshold"]["thresholds"] == head["thresholds"]
    wanted = expected_targets(run["csv"])
    assert report["test"]["images"] == 16
    labels = np.array([[np.nan if v is None else v for v in row] for row in report["predictions"]["label"]])
    np.testing.assert_array_equal(labels, np.array([wanted[p] for p in report["predictions"]["path"]]))
    assert report["test"]["masked_entries"] == int(np.isnan(labels).sum()) > 0
    for j, name in enumerate(LABELS):
        entry = report["at_threshold"]["per_label"][name]
        known = ~np.isnan(labels[:, j])
        assert entry["positives"] + entry["negatives"] == known.sum() and entry["masked"] == (~known).sum()
        for metric in ("roc_auc", "sensitivity", "specificity"):
            assert entry[metric]["ci_low"] <= entry[metric]["value"] <= entry[metric]["ci_high"]
        assert f"    {name}: threshold {entry['threshold']:.3f}, ROC-AUC" in out
    macro = np.mean([report["at_threshold"]["per_label"][n]["roc_auc"]["value"] for n in LABELS])
    assert report["at_threshold"]["metrics"]["roc_auc"]["value"] == pytest.approx(macro)
    probs = np.array(report["predictions"]["probability"])
    assert probs.shape == (16, 3)
    assert report["parity"]["max_abs_diff"] <= report["parity"]["tolerance"]
    assert np.abs(probs - np.array(report["predictions"]["cached_probability"])).max() <= report["parity"]["tolerance"]
    assert report["probe"] is not None and "accuracy" in report["baseline"]["metrics"]
    assert "| label | threshold |" in (run["run_dir"] / "report.md").read_text()
    assert (run["run_dir"] / "roc.png").stat().st_size > 0


def test_roc_curves_are_drawn_one_per_label_on_known_entries(tmp_path, monkeypatch):
    from featcache import multilabel_eval, plots

    drawn = {}
    monkeypatch.setattr(plots, "plot_roc", lambda curves, path, title: drawn.update(curves=curves))
    targets = np.array([[1, 0], [0, np.nan], [1, 1], [0, 0], [np.nan, 1]], np.float32)
    probs = np.linspace(0.1, 0.9, 10).reshape(5, 2)
    multilabel_eval._write_plots(tmp_path, {"class_names": ["A", "B"], "backbone": "tiny"}, targets, probs)
    assert [name for name, _, _ in drawn["curves"]] == ["A", "B"]
    assert [len(y) for _, y, _ in drawn["curves"]] == [4, 4]  # the masked entry of each label is not drawn


def test_masked_entries_take_no_part_in_the_test_metrics():
    """Moving the probabilities of masked entries changes no metric, point or interval; reading the masked
    entries as 0 does (so the first check can fail)."""
    from featcache.multilabel_eval import score_multilabel_with_intervals

    rng = np.random.default_rng(1)
    targets = (rng.random((60, 3)) < 0.5).astype(np.float64)
    probs = np.clip(0.6 * targets + 0.4 * rng.random((60, 3)), 0, 1)
    targets[rng.random((60, 3)) < 0.3] = np.nan
    moved = probs.copy()
    moved[np.isnan(targets)] = rng.random(int(np.isnan(targets).sum()))
    args = dict(label_names=list("ABC"), n_bootstrap=100, seed=0)
    first = score_multilabel_with_intervals(targets, probs, [0.5] * 3, **args)
    assert score_multilabel_with_intervals(targets, moved, [0.5] * 3, **args) == first
    from sklearn.metrics import roc_auc_score

    for j, name in enumerate("ABC"):
        known = ~np.isnan(targets[:, j])
        assert first["per_label"][name]["roc_auc"]["value"] == pytest.approx(roc_auc_score(targets[known, j],
                                                                                           probs[known, j]))
    counted = score_multilabel_with_intervals(np.nan_to_num(targets), moved, [0.5] * 3, **args)
    assert counted["per_label"]["A"]["roc_auc"] != first["per_label"]["A"]["roc_auc"]


def test_export_carries_every_label_loads_in_safe_mode_and_predict_calls_each_at_its_threshold(run):
    import keras
    import tensorflow as tf

    from featcache.verify import verify_export

    card = json.loads((run["model"] / "model.json").read_text())
    head = json.loads((run["run_dir"] / "head.json").read_text())
    assert card["task"] == "multilabel" and card["class_names"] == list(LABELS)
    assert card["thresholds"] == head["thresholds"] == [entry["threshold"] for entry in card["labels"]]
    assert [entry["name"] for entry in card["labels"]] == list(LABELS)
    assert all(entry["test"]["roc_auc"]["ci_low"] <= entry["test"]["roc_auc"]["value"] for entry in card["labels"])
    text = (run["model"] / "MODEL_CARD.md").read_text()
    for name, threshold in zip(LABELS, card["thresholds"]):
        assert f"| {name} | {threshold:.4f} |" in text
    assert "thresholds Pneumonia" in run["outputs"]["export"]
    model = keras.saving.load_model(run["model"] / "model.keras", safe_mode=True)
    head = model.layers[-1]  # the head, nested in the end-to-end model
    assert model.output_shape == (None, 3) and head.layers[-1].activation.__name__ == "sigmoid"
    assert head.layers[-1].units == 3
    predicted = json.loads(run["outputs"]["predict"])
    assert predicted["thresholds"] == card["thresholds"] and len(predicted["predictions"]) == 2
    files = sorted((run["root"] / "patient00025").rglob("*.jpg"))
    from featcache.decode import decode_bytes

    images = np.stack([decode_bytes(f.read_bytes(), card["image_size"], name=f.name) for f in files])
    probs = model.predict_on_batch(images)
    for p, row in zip(sorted(predicted["predictions"], key=lambda p: p["path"]), probs):
        assert list(p["probabilities"]) == list(LABELS)
        np.testing.assert_allclose(list(p["probabilities"].values()), row, atol=1e-5)
        called = [n for n, q, t in zip(LABELS, row, card["thresholds"]) if q >= t]
        assert p["positive_labels"] == called and p["label"] == ",".join(called)
    serving = tf.saved_model.load(str(run["model"] / "model.export")).signatures["serving_default"]
    out = serving(image_bytes=tf.constant([f.read_bytes() for f in files]))
    assert out["probability"].shape == (2, 3)
    assert [b.decode() for b in out["label"].numpy()] == [p["label"] for p in sorted(predicted["predictions"],
                                                                                     key=lambda p: p["path"])]
    assert verify_export(run["model"]).ok
    result = run_cli("predict", files[0], "--model", run["model"])
    assert result.exit_code == 0 and "Pneumonia 0." in result.output and files[0].name in result.output


def test_explain_refuses_a_multilabel_cache_or_model_in_one_line(run):
    for args in (["explain", "--cache-dir", run["cache_dir"], "--out", run["cache_dir"].parent / "explain"],
                 ["explain", run["root"] / "patient00025", "--model", run["model"]]):
        result = run_cli(*args)
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert "multi-label model of 3 labels" in result.output
