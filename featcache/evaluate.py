"""``featcache evaluate``: reassemble each backbone's end-to-end model, score it on the reserved test
images read from their raw files, prove parity with the cached path, and select the backbone by
validation ROC-AUC (never by test score) as the default of ``export``.

Per run folder ``<cache-dir>/runs/<cache stem>/``: report.json, report.md, report.html, roc.png, pr.png,
confusion.png, calibration.png (and calibration-calibrated.png for an isotonic head), trials.png. Across
backbones, in ``<cache-dir>/runs/``: selection.json, comparison.md, report.html, roc.png, pr.png.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tqdm import tqdm

from featcache import __version__
from featcache.assemble import EndToEnd, assemble_model, check_parity, predict_padded
from featcache.cache import find_cache, list_caches
from featcache.config import EvaluateConfig
from featcache.decode import scaled_decode
from featcache.errors import FeatcacheError
from featcache.integrity import check_plain_name, load_json
from featcache.calibration import calibration_with_intervals
from featcache.posthoc import calibrated_probability
from featcache.html_report import HTML_FILE, render_comparison, write_backbone_html
from featcache.metrics import majority_baseline, score_with_intervals
from featcache.probe import Probe
from featcache.reports import format_comparison, format_report
from featcache.runs import HEAD_FIELDS, RECORD_FILE, RUNS, check_head_matches_cache, load_head_record, load_probe, run_dir_for
from featcache.testset import TestImages, TestRows, read_test_rows

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
CALIBRATED_PLOT = "calibration-calibrated.png"  # reliability of the looked-up probabilities (--calibrate isotonic)
SELECTION_FILE = "selection.json"
# What export and the selection read from the JSON files evaluate writes.
SELECTION_FIELDS = {"backbone": str, "cache_file": str, "cache_fingerprint": str, "head_sha256": "sha256"}
REPORT_FIELDS = {"backbone": str, "cache_file": str, "cache_fingerprint": str, "head/head_sha256": "sha256",
                 "validation": dict, "at_threshold/metrics": dict, "at_0.5/metrics": dict, "test/images": int,
                 "parity": dict, "predictions/path": list, "predictions/label": list, "predictions/probability": list,
                 "data_dir": str}
HEAD_KEYS = ("head_sha256", "trial_number", "params", "threshold", "threshold_method", "study_name")  # report["head"]
CRITERION = "highest validation ROC-AUC of the chosen head (head.json val_metrics.roc_auc); test scores are not used"


@dataclass(frozen=True)
class TestScores:
    """Per-image results of the test images that could be read, in cache row order.

    Attributes:
        paths: (n,) relative to the data folder.
        labels: (n,) 0/1.
        probs: (n,) the end-to-end model on the raw files.
        cached: (n,) the head on the cached maps of the same images.
        probe: (n,) the linear probe on their cached pooled vectors, or None without a probe.
        skipped: cached test rows whose file is gone or unreadable now.
    """

    paths: list[str]
    labels: np.ndarray
    probs: np.ndarray
    cached: np.ndarray
    probe: np.ndarray | None
    skipped: list[dict]

    def predictions(self) -> dict:
        """report.json's ``predictions``: each image's path, label, end-to-end and cached-maps probabilities."""
        return {"path": self.paths, "label": self.labels.tolist(), "probability": self.probs.tolist(),
                "cached_probability": self.cached.tolist()}


def evaluate_backbones(config: EvaluateConfig) -> tuple[list[dict], dict]:
    """Evaluate each selected cache's head end to end, then (re)write the selection and comparison.

    Returns:
        (reports of this run, selection over every backbone with a current report).

    Raises:
        FeatcacheError: no trained head, a head of another cache, changed weights or images, a missing
            test folder, or a parity failure. Nothing of a backbone is written before it passed.
    """
    reports = [evaluate_cache(path, config) for path in select_caches(config)]
    selection = write_selection(config.cache_dir)
    if config.mlflow:
        from featcache.tracking import log_evaluation

        log_evaluation(config.mlflow, reports, selection, Path(config.cache_dir) / RUNS)
    return reports, selection


def select_caches(config: EvaluateConfig) -> list[Path]:
    """The caches of ``config.backbones``, or every cache in the folder that has a trained head."""
    if config.backbones:
        return [find_cache(config.cache_dir, name) for name in config.backbones]
    found = [p for p in list_caches(config.cache_dir) if (run_dir_for(p) / RECORD_FILE).is_file()]
    if not found:
        raise FeatcacheError(f"No trained head in {config.cache_dir}; run 'featcache extract' and "
                             f"'featcache train-head' first. Received: cache_dir={str(config.cache_dir)!r}")
    return found


def evaluate_cache(cache_path: Path, config: EvaluateConfig) -> dict:
    """Score one backbone's end-to-end model on its test images; write its report files."""
    record = load_head_record(cache_path)
    manifest = check_head_matches_cache(record, cache_path)
    data_dir = Path(config.data_dir) if config.data_dir is not None else Path(manifest["data_dir"])
    test = read_test_rows(cache_path, data_dir)
    assembled = assemble_model(cache_path, record, manifest)
    probe = load_probe(Path(record["run_dir"]), manifest["fingerprint"])
    scores = score_test_images(test, TestImages(test, data_dir, manifest["image_size"], config.max_pixels,
                                                 scaled_decode(manifest.get("resize"))),
                               assembled, probe, config)
    parity = check_parity(scores.probs, scores.cached, manifest["dtype"], scores.paths,
                          manifest.get("precision", "float32"))
    if record.get("task") == "multilabel":  # several 0/1 labels: per-label thresholds, per-label and macro metrics
        from featcache.multilabel_eval import evaluate_multilabel

        return evaluate_multilabel(cache_path, record, manifest, data_dir, test, scores, parity, probe,
                                   assembled.weights_sha256, config)
    if scores.probs.ndim == 2:  # three or more classes: argmax, per-class and macro metrics
        from featcache.multiclass_eval import evaluate_multiclass

        return evaluate_multiclass(cache_path, record, manifest, data_dir, test, scores, parity, probe, assembled,
                                   config)
    threshold = float(record["threshold"])
    scored = {
        "at_threshold": score_with_intervals(scores.labels, scores.probs, threshold, n_bootstrap=config.n_bootstrap,
                                             seed=config.seed),
        "at_0.5": score_with_intervals(scores.labels, scores.probs, 0.5, n_bootstrap=config.n_bootstrap,
                                       seed=config.seed),
    }
    report = _report(cache_path, record, manifest, data_dir, scores, test.train_labels, assembled.weights_sha256,
                     parity, scored)
    report["calibration"] = calibration_with_intervals(scores.labels, scores.probs, n_bootstrap=config.n_bootstrap,
                                                       seed=config.seed)
    report["probe"] = score_probe(probe, manifest, record, scores, config)
    report["predictions"] = scores.predictions()
    report.update(score_posthoc(record.get("calibration"), scores, config, report["predictions"]))
    write_report_files(Path(record["run_dir"]), report, scores.labels, scores.probs, scores.probe)
    write_backbone_html(report, Path(record["run_dir"]), cache_path, assembled, data_dir)
    return report


def score_test_images(test: TestRows, images: TestImages, assembled: EndToEnd, probe: Probe | None,
                      config: EvaluateConfig) -> TestScores:
    """The end-to-end model on the raw test files, the head on their cached maps and the probe on their pooled
    vectors, a batch of ``config.batch_size`` test rows at a time: only per-image results are kept.

    Every batch has the same width (the last one padded), the batches ``predict_images`` would run over the
    whole set, so the probabilities are the ones it gives when no file is skipped.

    Raises:
        CacheMismatchError, DamagedFileError, DataError: as ``TestImages.batches``, after the last batch.
    """
    width = max(1, min(config.batch_size, int(test.original.sum())))
    parts: dict[str, list] = {"paths": [], "labels": [], "probs": [], "cached": [], "probe": []}
    with tqdm(total=len(test.rows), unit="img", desc=f"evaluate {assembled.manifest['backbone']}",
              disable=not config.progress, dynamic_ncols=True) as bar:
        for batch in images.batches(width):
            if batch.paths:
                parts["paths"] += batch.paths
                parts["labels"].append(batch.labels)
                parts["probs"].append(predict_padded(assembled.model, batch.images, width))
                parts["cached"].append(predict_padded(assembled.head, batch.features, width, dtype=np.float32))
                parts["probe"].append(probe.predict(batch.pooled) if probe is not None else None)
            bar.update(batch.rows)
    return TestScores(parts["paths"], np.concatenate(parts["labels"]), np.concatenate(parts["probs"]),
                      np.concatenate(parts["cached"]), np.concatenate(parts["probe"]) if probe is not None else None,
                      images.skipped)


def _report(cache_path, record, manifest, data_dir, test: TestScores, train_labels, weights_sha256, parity,
            scored) -> dict:
    return {
        **report_fields(cache_path, record, manifest, data_dir, weights_sha256),
        "test": {"images": len(test.paths), "positives": int(test.labels.sum()),
                 "negatives": int(len(test.labels) - test.labels.sum()), "skipped": test.skipped,
                 "skipped_at_extraction": skipped_test_files(manifest)},
        **scored,
        "baseline": majority_baseline(train_labels, test.labels),
        "parity": parity,
    }


def report_fields(cache_path, record: dict, manifest: dict, data_dir, weights_sha256: str,
                  head_keys: tuple[str, ...] = HEAD_KEYS) -> dict:
    """What every report.json holds, whatever the head: the cache and its verified weights, the head (its
    ``head_keys`` of head.json) and validation metrics, the data folder, the versions and the time."""
    import keras
    import tensorflow as tf

    return {
        "backbone": manifest["backbone"],
        "cache_file": Path(cache_path).name,
        "cache_fingerprint": manifest["fingerprint"],
        "run_dir": record["run_dir"],
        "image_size": manifest["image_size"],
        "dtype": manifest["dtype"],
        "class_names": manifest["class_names"],
        "weights": {**manifest["weights"], "verified_sha256": weights_sha256},
        "head": {key: record[key] for key in head_keys},
        "validation": record["val_metrics"],
        "data_dir": str(Path(data_dir).resolve()),
        "versions": {"featcache": __version__, "tensorflow": tf.__version__, "keras": keras.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def skipped_test_files(manifest: dict) -> list[dict]:
    """The test files extraction skipped (those of a cache older than the split field: a path under test/)."""
    return [s for s in manifest.get("skipped", []) if s.get("split") == "test"
            or "split" not in s and s["path"].startswith("test/")]


def score_probe(probe: Probe | None, manifest: dict, record: dict, test: TestScores,
                config: EvaluateConfig) -> dict | None:
    """The linear probe of ``train-head`` on the same test images (their cached pooled vectors), at 0.5.

    Returns:
        ``{"c", "validation", "test", "head_below_probe_on_validation"}``, or None when the run folder has no
        probe of this cache (a head trained by an older featcache).
    """
    if probe is None:
        log.warning("%s has no linear probe of this cache; re-run 'featcache train-head' to get the floor",
                    record["run_dir"])
        return None
    below = record["val_metrics"]["roc_auc"] < probe.val_scores["roc_auc"]
    if below:
        log.warning("%s: the tuned head is below the linear probe on validation (ROC-AUC %.4f < %.4f)",
                    manifest["backbone"], record["val_metrics"]["roc_auc"], probe.val_scores["roc_auc"])
    test_scores = score_with_intervals(test.labels, test.probe, 0.5, n_bootstrap=config.n_bootstrap, seed=config.seed)
    return {"c": probe.c, "validation": probe.val_scores, "test": test_scores, "head_below_probe_on_validation": below}


def score_posthoc(record: dict | None, scores: TestScores, config: EvaluateConfig, predictions: dict) -> dict:
    """The head's post-hoc calibration (``train-head --calibrate``) for the report: ``{"post_hoc_calibration"}``,
    and for a lookup applied outside the model (isotonic) ``{"calibrated"}``, the calibration of the looked-up
    test probabilities, which are added to ``predictions`` as ``calibrated_probability``. {} when uncalibrated."""
    if not record:
        return {}
    calibrated = calibrated_probability(record, scores.probs)
    if calibrated is None:
        return {"post_hoc_calibration": record}
    predictions["calibrated_probability"] = calibrated.tolist()
    return {"post_hoc_calibration": record, "calibrated": {"method": record["method"], **calibration_with_intervals(
        scores.labels, calibrated, n_bootstrap=config.n_bootstrap, seed=config.seed)}}


def write_report_files(run_dir: Path, report: dict, labels: np.ndarray, probs: np.ndarray,
                       probe_probs: np.ndarray | None = None) -> None:
    """report.json, report.md and the plots of one backbone, each replaced atomically. ``probe_probs``: the linear
    probe's test probabilities, drawn beside the head's in the precision-recall plot."""
    from featcache.plots import plot_calibration, plot_confusions, plot_pr, plot_roc, plot_run_trials

    names = report["class_names"]
    if "calibration" in report:
        plot_calibration(labels, probs, report["calibration"]["bins"], names, run_dir / "calibration.png",
                         f"Test, {report['backbone']}")
    if "calibrated" in report:
        plot_calibration(labels, np.array(report["predictions"]["calibrated_probability"]),
                         report["calibrated"]["bins"], names, run_dir / CALIBRATED_PLOT,
                         f"Test, {report['backbone']}, {report['calibrated']['method']}-calibrated")
    else:
        (run_dir / CALIBRATED_PLOT).unlink(missing_ok=True)
    plot_roc([(report["backbone"], labels, probs)], run_dir / "roc.png", f"Test ROC, {report['backbone']}")
    probe_curve = [("linear probe", labels, probe_probs)] if probe_probs is not None else []
    plot_pr([(report["backbone"], labels, probs), *probe_curve], run_dir / "pr.png",
            f"Test precision-recall, {report['backbone']}")
    plot_confusions([(f"threshold {report['at_threshold']['threshold']:.3f}",
                      report["at_threshold"]["confusion"]["matrix"]),
                     ("threshold 0.5", report["at_0.5"]["confusion"]["matrix"])], names, run_dir / "confusion.png")
    plot_run_trials(run_dir, report["backbone"])
    write_atomic(run_dir / "report.md", format_report(report))
    write_report_json(run_dir, report)


def write_report_json(run_dir: Path, report: dict) -> None:
    """report.json (non-finite numbers as null), replaced atomically."""
    write_atomic(run_dir / REPORT_FILE, json.dumps(_finite(report), indent=1, sort_keys=True) + "\n")


def _finite(value):
    """NaN (a metric undefined on this test set) -> None, so report.json is strict JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def current_reports(cache_dir: Path) -> list[dict]:
    """Reports still valid: the report's head and cache are the ones in the run folder now."""
    reports = []
    for cache_path in list_caches(cache_dir):
        run_dir = run_dir_for(cache_path)
        if not (run_dir / REPORT_FILE).is_file() or not (run_dir / RECORD_FILE).is_file():
            continue
        report = read_report(run_dir)
        head = load_json(run_dir / RECORD_FILE, HEAD_FIELDS, "re-run 'featcache train-head'.")
        if (report.get("head", {}).get("head_sha256") == head.get("head_sha256")
                and report.get("cache_fingerprint") == head.get("cache_fingerprint")
                and report.get("cache_file") == cache_path.name):
            reports.append(report)
        else:
            log.info("ignoring the stale report in %s (the head changed since); re-run 'featcache evaluate'", run_dir)
    return reports


def select_backbone(reports: list[dict]) -> dict:
    """The report with the highest validation ROC-AUC (then lower validation loss, then name).

    Test metrics are listed for context only; they take no part in the choice.
    """
    if not reports:
        raise FeatcacheError("No evaluated backbone to select from; run 'featcache evaluate' first. Received: reports=[]")
    def key(r: dict) -> tuple:
        return (-r["validation"]["roc_auc"], r["validation"].get("loss", 0.0), r["cache_file"])

    best = min(reports, key=key)
    return {
        "backbone": best["backbone"], "cache_file": best["cache_file"], "cache_fingerprint": best["cache_fingerprint"],
        "head_sha256": best["head"]["head_sha256"], "criterion": CRITERION,
        "candidates": [{"backbone": r["backbone"], "cache_file": r["cache_file"],
                        "val_roc_auc": r["validation"]["roc_auc"],
                        "test_accuracy": r["at_threshold"]["metrics"]["accuracy"]["value"],
                        "test_roc_auc": r["at_threshold"]["metrics"]["roc_auc"]["value"]}
                       for r in sorted(reports, key=key)],
    }


def write_selection(cache_dir: Path) -> dict:
    """selection.json, comparison.md and the ROC curves of every backbone with a current report."""
    from featcache.plots import plot_pr, plot_roc

    reports = current_reports(cache_dir)
    selection = select_backbone(reports)
    runs = Path(cache_dir) / RUNS
    curves = [(r["backbone"], np.array(r["predictions"]["label"]), np.array(r["predictions"]["probability"]))
              for r in reports if r.get("task") not in ("multiclass", "multilabel")]  # their curves: in the run folder
    plot_roc(curves, runs / "roc.png", "Test ROC, all backbones")
    plot_pr(curves, runs / "pr.png", "Test precision-recall, all backbones")
    write_atomic(runs / "comparison.md", format_comparison(reports, selection))
    write_atomic(runs / HTML_FILE, render_comparison(reports, selection, runs))
    write_atomic(runs / SELECTION_FILE, json.dumps(selection, indent=1, sort_keys=True) + "\n")
    log.info("selected %s (%s)", selection["backbone"], CRITERION)
    return selection


def read_selection(cache_dir: Path) -> dict:
    """The backbone ``evaluate`` selected.

    Raises:
        FeatcacheError: ``evaluate`` has not run in this cache folder.
    """
    path = Path(cache_dir) / RUNS / SELECTION_FILE
    if not path.is_file():
        raise FeatcacheError(f"No {path}; run 'featcache evaluate' first, or pass --backbone NAME. "
                             f"Received: cache_dir={str(cache_dir)!r}")
    selection = load_json(path, SELECTION_FIELDS, "re-run 'featcache evaluate'.")
    check_plain_name(selection["cache_file"], path, "re-run 'featcache evaluate'.")
    return selection


def read_report(run_dir: Path) -> dict:
    """``report.json`` of a run folder, checked for the fields ``export`` and the selection read.

    Raises:
        DamagedFileError: not JSON, or a field missing or of the wrong type.
    """
    return load_json(Path(run_dir) / REPORT_FILE, REPORT_FIELDS, "re-run 'featcache evaluate'.")


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
