"""``featcache evaluate`` end to end on the dev X-rays: the report's numbers, parity, selection by
validation, report files, and the CLI's errors and exit codes."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pipeline import copy_run, dev_pipeline, run_cli
from sklearn.metrics import accuracy_score, average_precision_score, confusion_matrix, recall_score, roc_auc_score
from test_reports import fake_report

from featcache.errors import FeatcacheError
from featcache.evaluate import select_backbone


@pytest.fixture(scope="module")
def run(tmp_path_factory, dev_data):
    return dev_pipeline(tmp_path_factory, dev_data)


def test_report_numbers_agree_with_sklearn_on_its_predictions(run):
    report = json.loads((run["run_dir"] / "report.json").read_text())
    p = report["predictions"]
    labels, probs, cached = np.array(p["label"]), np.array(p["probability"]), np.array(p["cached_probability"])
    assert report["test"] == {"images": 150, "positives": 111, "negatives": 39, "skipped": [],
                              "skipped_at_extraction": []}
    assert len(set(p["path"])) == 150 and all(path.startswith("test/") for path in p["path"])
    head = json.loads((run["run_dir"] / "head.json").read_text())
    threshold = head["threshold"]
    for key, t in (("at_threshold", threshold), ("at_0.5", 0.5)):
        m = report[key]["metrics"]
        called = (probs >= t).astype(int)
        assert report[key]["threshold"] == t
        assert m["accuracy"]["value"] == pytest.approx(accuracy_score(labels, called))
        assert m["sensitivity"]["value"] == pytest.approx(recall_score(labels, called))
        assert m["specificity"]["value"] == pytest.approx(recall_score(1 - labels, 1 - called))
        assert m["roc_auc"]["value"] == pytest.approx(roc_auc_score(labels, probs))
        assert m["pr_auc"]["value"] == pytest.approx(average_precision_score(labels, probs))
        assert report[key]["confusion"]["matrix"] == confusion_matrix(labels, called).tolist()
        assert all(v["ci_low"] <= v["value"] <= v["ci_high"] for v in m.values())
    assert report["parity"]["max_abs_diff"] == pytest.approx(np.abs(probs - cached).max(), abs=1e-7)
    assert report["parity"]["max_abs_diff"] <= 1e-3 and report["parity"]["tolerance"] == 1e-3
    assert report["baseline"]["class_index"] == 1  # PNEUMONIA is the training majority
    assert report["baseline"]["metrics"]["accuracy"] == pytest.approx(111 / 150)
    assert report["validation"] == head["val_metrics"]
    assert report["weights"]["verified_sha256"] == report["weights"]["sha256"]


def test_linear_probe_is_scored_on_the_same_test_images_beside_the_head(run):
    import h5py

    from featcache.probe import Probe

    report = json.loads((run["run_dir"] / "report.json").read_text())
    probe_file = json.loads((run["run_dir"] / "probe.json").read_text())
    head = json.loads((run["run_dir"] / "head.json").read_text())
    labels = np.array(report["predictions"]["label"])
    with h5py.File(run["cache"], "r") as handle:  # the test rows' cached pooled vectors, in the report's order
        paths = handle["files/path"].asstr()[...]
        rows = {paths[s]: i for i, s in enumerate(handle["source_index"][...])
                if handle["split"][i] == 2 and handle["copy_index"][i] == 0}
        pooled = handle["pooled"][...][[rows[p] for p in report["predictions"]["path"]]]
    probs = Probe.from_dict(probe_file).predict(pooled)
    probe = report["probe"]
    assert probe["c"] == probe_file["c"] == head["probe"]["c"]
    assert probe["validation"]["roc_auc"] == head["probe"]["val_roc_auc"]
    auc = probe["test"]["metrics"]["roc_auc"]
    assert auc["value"] == pytest.approx(roc_auc_score(labels, probs)) and auc["ci_low"] <= auc["value"] <= auc["ci_high"]
    assert probe["head_below_probe_on_validation"] == (head["val_metrics"]["roc_auc"] < head["probe"]["val_roc_auc"])
    assert "Linear probe (standardized logistic regression" in (run["run_dir"] / "report.md").read_text()
    comparison = (run["cache_dir"] / "runs" / "comparison.md").read_text()
    assert "Probe Test ROC-AUC" in comparison and f"{auc['value']:.3f}" in comparison
    assert "linear probe (floor): test ROC-AUC" in run["outputs"]["evaluate"]


def test_calibration_of_the_test_probabilities_is_reported_and_drawn(run):
    from sklearn.metrics import brier_score_loss

    report = json.loads((run["run_dir"] / "report.json").read_text())
    labels, probs = np.array(report["predictions"]["label"]), np.array(report["predictions"]["probability"])
    calibration = report["calibration"]
    brier, ece = calibration["metrics"]["brier"], calibration["metrics"]["ece"]
    assert brier["value"] == pytest.approx(brier_score_loss(labels, probs))
    assert brier["ci_low"] <= brier["value"] <= brier["ci_high"] and ece["ci_low"] <= ece["value"] <= ece["ci_high"]
    bins = calibration["bins"]
    assert sum(b["count"] for b in bins) == len(labels) == report["test"]["images"]
    assert ece["value"] == pytest.approx(sum(b["count"] * abs(b["fraction_positive"] - b["mean_prob"])
                                             for b in bins if b["count"]) / len(labels))
    assert "## Calibration on test" in (run["run_dir"] / "report.md").read_text()
    assert (run["run_dir"] / "calibration.png").stat().st_size > 0
    assert f"{ece['value']:.3f} [" in (run["cache_dir"] / "runs" / "comparison.md").read_text()


def test_report_files_and_selection(run):
    for name in ("report.json", "report.md", "roc.png", "pr.png", "confusion.png", "calibration.png", "trials.png"):
        assert (run["run_dir"] / name).stat().st_size > 0, name
    runs = run["cache_dir"] / "runs"
    selection = json.loads((runs / "selection.json").read_text())
    assert selection["backbone"] == "tiny" and selection["cache_file"] == run["cache"].name
    assert "validation ROC-AUC" in selection["criterion"]
    assert (runs / "roc.png").is_file() and "Test Accuracy" in (runs / "comparison.md").read_text()
    out = run["outputs"]["evaluate"]
    assert "tiny: 150 test images" in out and "selected tiny" in out and "parity max diff" in out


def test_selection_uses_validation_not_test():
    strong_val = fake_report("vgg16", val_auc=0.97, test_probs_quality=0.05, seed=1)  # weak on test
    strong_test = fake_report("resnet152", val_auc=0.93, test_probs_quality=0.95, seed=2)
    assert (strong_test["at_threshold"]["metrics"]["roc_auc"]["value"]
            > strong_val["at_threshold"]["metrics"]["roc_auc"]["value"])
    for order in ([strong_val, strong_test], [strong_test, strong_val]):
        assert select_backbone(order)["backbone"] == "vgg16"
    tied = fake_report("resnet152", val_auc=0.97, test_probs_quality=0.95, seed=3)
    tied["validation"]["loss"] = 0.1  # equal AUC: the lower validation loss wins
    assert select_backbone([strong_val, tied])["backbone"] == "resnet152"
    with pytest.raises(FeatcacheError, match="run 'featcache evaluate' first"):
        select_backbone([])


def _one_line_error(result, message):
    assert result.exit_code == 1, result.output
    assert message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_no_test_folder(run, tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    result = run_cli("evaluate", "--no-progress", "--cache-dir", run["cache_dir"], "--data", tmp_path / "data")
    _one_line_error(result, "No test folder")


def test_head_trained_on_another_cache(run, tmp_path):
    copy = copy_run(run, tmp_path)
    record = json.loads((copy["run_dir"] / "head.json").read_text())
    record["cache_fingerprint"] = "f" * 64
    (copy["run_dir"] / "head.json").write_text(json.dumps(record))
    before = (copy["run_dir"] / "report.json").read_bytes()
    _one_line_error(run_cli("evaluate", "--no-progress", "--cache-dir", copy["cache_dir"]), "was trained on cache")
    assert (copy["run_dir"] / "report.json").read_bytes() == before  # nothing rewritten


def test_weights_that_no_longer_match(run, tmp_path):
    copy = copy_run(run, tmp_path)
    weights = copy["cache"].with_name(f"{copy['cache'].stem}.weights.h5")
    import h5py

    with h5py.File(weights, "r+") as handle:  # nudge one kernel value
        kernels = []
        handle.visititems(lambda n, o: kernels.append(o) if isinstance(o, h5py.Dataset) and o.ndim == 4 else None)
        kernels[0][0, 0, 0, 0] += 0.5
    _one_line_error(run_cli("evaluate", "--no-progress", "--cache-dir", copy["cache_dir"]), "restore the original weights")


def test_changed_and_missing_test_images(run, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(run["data"] / "test", data / "test")
    gone = min((data / "test" / "NORMAL").iterdir())
    gone.unlink()
    copy = copy_run(run, tmp_path)
    result = run_cli("evaluate", "--no-progress", "--cache-dir", copy["cache_dir"], "--data", data, "--bootstrap", "20")
    assert result.exit_code == 0, result.output
    assert f"skipped 1 unreadable test images: test/NORMAL/{gone.name}" in result.output
    report = json.loads((copy["run_dir"] / "report.json").read_text())
    assert report["test"]["images"] == 149 and report["test"]["skipped"][0]["path"] == f"test/NORMAL/{gone.name}"
    changed = sorted((data / "test" / "PNEUMONIA").iterdir())[3]
    changed.write_bytes(changed.read_bytes() + b"\0")
    _one_line_error(run_cli("evaluate", "--no-progress", "--cache-dir", copy["cache_dir"], "--data", data),
                    "1 test images in")


@pytest.mark.parametrize("args, message", [
    (["--bootstrap", "0"], "--bootstrap must be >= 1"),
    (["--backbone", "vgg16"], "No vgg16 cache"),
    (["--backbone", "tiny", "--backbone", "tiny"], "Each --backbone once"),
])
def test_bad_options(run, args, message):
    _one_line_error(run_cli("evaluate", "--no-progress", "--cache-dir", run["cache_dir"], *args), message)


def test_no_trained_head(tmp_path):
    _one_line_error(run_cli("evaluate", "--no-progress", "--cache-dir", tmp_path), "No trained head")


# --- bounded memory: test images and maps in batches ----------------------------------------------


def _evaluate_copy(run, target, *args):
    copy = copy_run(run, target)
    result = run_cli("evaluate", "--no-progress", "--cache-dir", copy["cache_dir"], "--bootstrap", "50", *args)
    assert result.exit_code == 0, result.output
    return copy, json.loads((copy["run_dir"] / "report.json").read_text())


def _whole_arrays(cache):
    """Every original test row's images (decoded now), maps, pooled vectors and labels, all at once: what
    evaluate held before it streamed."""
    import h5py

    from featcache.decode import decode_bytes

    with h5py.File(cache, "r") as handle:
        manifest = json.loads(handle.attrs["manifest"])
        rows = np.flatnonzero((handle["split"][...] == 2) & (handle["copy_index"][...] == 0))
        paths = handle["files/path"].asstr()[...][handle["source_index"][...][rows]].tolist()
        features, pooled = handle["features"][...][rows], handle["pooled"][...][rows]
        labels = handle["labels"][...][rows].astype(np.int64)
    root = Path(manifest["data_dir"])
    images = np.stack([decode_bytes((root / p).read_bytes(), manifest["image_size"], name=p) for p in paths])
    return paths, labels, images, features, pooled


def test_streamed_batches_give_what_whole_arrays_give(run, tmp_path, monkeypatch):
    import featcache.evaluate as evaluate
    from featcache.assemble import assemble_model, predict_features, predict_images
    from featcache.metrics import score_with_intervals
    from featcache.probe import Probe
    from featcache.runs import check_head_matches_cache, load_head_record

    seen = []
    real = evaluate.predict_padded
    monkeypatch.setattr(evaluate, "predict_padded", lambda model, x, *a, **k: seen.append(len(x)) or real(model, x, *a, **k))
    copy, report = _evaluate_copy(run, tmp_path, "--batch-size", "7")
    assert seen and max(seen) <= 7 and sum(seen) == 2 * 150  # the model and the head never see more than a batch
    paths, labels, images, features, pooled = _whole_arrays(copy["cache"])
    record = load_head_record(copy["cache"])
    assembled = assemble_model(copy["cache"], record, check_head_matches_cache(record, copy["cache"]))
    probs = predict_images(assembled.model, images, 7)
    p = report["predictions"]
    assert p["path"] == paths and p["label"] == labels.tolist()
    assert p["probability"] == probs.tolist()  # bit for bit: the same batches of 7
    assert p["cached_probability"] == predict_features(assembled.head, features, 7).tolist()
    finite = lambda scores: json.loads(json.dumps(evaluate._finite(scores)))  # noqa: E731 (as report.json stores it)
    for key, threshold in (("at_threshold", record["threshold"]), ("at_0.5", 0.5)):
        assert report[key] == finite(score_with_intervals(labels, probs, threshold, n_bootstrap=50, seed=0))
    probe = Probe.from_dict(json.loads((copy["run_dir"] / "probe.json").read_text()))
    assert report["probe"]["test"] == finite(score_with_intervals(labels, probe.predict(pooled), 0.5, n_bootstrap=50))


def test_the_batch_size_changes_nothing_but_the_last_float32_bits(run, tmp_path):
    reports = [_evaluate_copy(run, tmp_path / str(size), "--batch-size", str(size))[1] for size in (7, 64)]
    noisy = {("created",), ("predictions", "probability"), ("predictions", "cached_probability"),
             ("parity", "max_abs_diff"), ("parity", "mean_abs_diff")}

    def leaves(report, prefix=()):
        for key, value in report.items():
            yield from leaves(value, (*prefix, key)) if isinstance(value, dict) else [((*prefix, key), value)]

    small, large = dict(leaves(reports[0])), dict(leaves(reports[1]))
    assert small.keys() == large.keys()
    # Calibration averages the probabilities themselves: it moves with their last bits, within float error.
    noisy |= {key for key in small if key[0] == "calibration" and key[1] in ("metrics", "bins")}
    for key in small.keys() - noisy - {("run_dir",)}:  # two copies of the run folder
        assert small[key] == large[key], key  # metrics, intervals, paths, counts, the probe: identical
    # A row's float32 probability can differ in the last bits between batch shapes (CPU kernels are chosen by shape).
    for key in noisy - {("created",), ("calibration", "bins")}:
        np.testing.assert_allclose(small[key], large[key], rtol=0, atol=1e-6, err_msg=str(key))
    for one, other in zip(small[("calibration", "bins")], large[("calibration", "bins")], strict=True):
        assert one["count"] == other["count"]
        if one["count"]:  # an empty bin has no means (null in report.json)
            np.testing.assert_allclose([one["mean_prob"], one["fraction_positive"]],
                                       [other["mean_prob"], other["fraction_positive"]], rtol=0, atol=1e-6)


def test_a_damaged_last_test_row_is_refused_after_streaming_and_nothing_is_written(run, tmp_path):
    import h5py

    copy = copy_run(run, tmp_path)
    with h5py.File(copy["cache"], "r+") as handle:  # valid HDF5: fletcher32 recomputed, only the digest differs
        last = int(np.flatnonzero(handle["split"][...] == 2)[-1])
        handle["features"][last, 0, 0, 0] += 1
    before = {p.name: p.read_bytes() for p in copy["run_dir"].iterdir() if p.is_file()}
    _one_line_error(run_cli("evaluate", "--no-progress", "--cache-dir", copy["cache_dir"], "--bootstrap", "10",
                            "--batch-size", "16"), "/features (test rows) does not match the SHA-256")
    assert {p.name: p.read_bytes() for p in copy["run_dir"].iterdir() if p.is_file()} == before


def test_progress_bar_counts_the_test_images(run, tmp_path):
    copy = copy_run(run, tmp_path)
    result = run_cli("evaluate", "--progress", "--cache-dir", copy["cache_dir"], "--bootstrap", "10")
    assert result.exit_code == 0, result.output
    assert "evaluate tiny" in result.output and "150/150" in result.output


def test_html_reports_are_self_contained_and_show_the_most_wrong_images(run):
    import base64
    from html.parser import HTMLParser

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.images, self.links, self.text = [], [], [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            attrs = dict(attrs)
            if tag == "img":
                self.images.append((attrs["src"], attrs.get("alt", "")))
            if tag == "a":
                self.links.append(attrs["href"])

        def handle_data(self, data):
            self.text.append(data)

    report = json.loads((run["run_dir"] / "report.json").read_text())
    page = Page()
    page.feed((run["run_dir"] / "report.html").read_text())
    assert "script" not in page.tags and page.images
    for src, _ in page.images:  # every image is inside the file: readable offline, alone
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    text = " ".join(page.text)
    acc = report["at_threshold"]["metrics"]["accuracy"]
    assert f"{acc['value']:.3f} [{acc['ci_low']:.3f}, {acc['ci_high']:.3f}]" in text and "Random backbone weights" in text
    assert "Brier score" in text and "linear probe at 0.5" in text
    alts = " | ".join(alt for _, alt in page.images)  # every plot the issue asks for, embedded
    for plot in ("ROC curve", "precision-recall curves", "confusion matrices at the threshold and at 0.5",
                 "reliability diagram", "validation ROC-AUC per trial"):
        assert plot in alts, plot
    # the gallery: the most confident errors, found here from the report's own predictions
    threshold, predictions = report["at_threshold"]["threshold"], report["predictions"]
    rows = list(zip(predictions["path"], predictions["label"], predictions["probability"]))
    fp = [p for p, y, q in sorted(rows, key=lambda r: -r[2]) if y == 0 and q >= threshold][:4]
    fn = [p for p, y, q in sorted(rows, key=lambda r: r[2]) if y == 1 and q < threshold][:4]
    captions = [alt for _, alt in page.images if ": P(PNEUMONIA) = " in alt]
    assert [c.split(":")[0] for c in captions] == fp + fn and len(captions) == len(fp) + len(fn) > 0
    comparison = Page()
    comparison.feed((run["cache_dir"] / "runs" / "report.html").read_text())
    assert "script" not in comparison.tags and all(s.startswith("data:image/png") for s, _ in comparison.images)
    assert comparison.links == [f"{run['cache'].stem}/report.html"]
    assert [alt for _, alt in comparison.images] == ["test ROC, all backbones", "test precision-recall, all backbones"]
    assert (run["cache_dir"] / "runs" / comparison.links[0]).is_file()
