"""Test-set evaluation of a multi-class head (three or more classes): the decision is the argmax of the class
probabilities; per-class and macro metrics with percentile bootstrap intervals, the k x k confusion matrix,
one-vs-rest ROC curves, and the report files ``evaluate`` writes for a binary head (report.json, report.md,
roc.png, pr.png, confusion.png, calibration.png, trials.png, report.html).

Metrics (each ``{"value", "ci_low", "ci_high"}``): ``accuracy``; ``roc_auc``, ``sensitivity`` and
``specificity``, the macro (unweighted) means over classes of each class's one-vs-rest ROC-AUC, recall and
specificity; and the same three per class. A threshold, Youden's J and ``--min-sensitivity`` have no
multi-class meaning: report.json keeps the binary keys ``at_threshold`` and ``at_0.5`` (what the selection,
export and the summaries read) and both hold the argmax results, with ``"decision": "argmax"``.
Calibration is that of the top-class confidence (``featcache.multiclass_calibration``: top-label ECE,
multi-class Brier score, NLL), drawn in calibration.png; a temperature fitted by ``train-head --calibrate
temperature`` is recorded as ``post_hoc_calibration``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from featcache.metrics import LEVEL, bootstrap_index_blocks, percentile_interval, _ranking_samples
from featcache.multiclass import ARGMAX, one_vs_rest_auc
from featcache.multiclass_calibration import calibration_with_intervals
from featcache.reports import MACRO, format_ci, format_value, macro_table, markdown_table, parity_sentence, probe_sentence

log = logging.getLogger(__name__)

PER_CLASS = ("roc_auc", "sensitivity", "specificity")


def point_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """``{"accuracy", "roc_auc", "sensitivity", "specificity"}`` (macro) and ``per_class`` {metric: (k,)};
    NaN where a class is absent from ``labels``."""
    labels, probs = np.asarray(labels, np.int64), np.asarray(probs, np.float64)
    predicted = probs.argmax(axis=1)
    classes = probs.shape[1]
    with np.errstate(invalid="ignore"):
        recall = np.array([np.mean(predicted[labels == k] == k) if (labels == k).any() else np.nan
                           for k in range(classes)])
        specificity = np.array([np.mean(predicted[labels != k] != k) if (labels != k).any() else np.nan
                                for k in range(classes)])
    auc = one_vs_rest_auc(labels, probs)
    per_class = {"roc_auc": auc, "sensitivity": recall, "specificity": specificity}
    return {"accuracy": float(np.mean(predicted == labels)), "roc_auc": float(np.mean(auc)),
            "sensitivity": float(np.mean(recall)), "specificity": float(np.mean(specificity)), "per_class": per_class}


def bootstrap_samples(labels: np.ndarray, probs: np.ndarray, indices: np.ndarray) -> dict:
    """Each metric on each resample (rows of ``indices``): macro ``{name: (B,)}`` and ``per_class``
    ``{name: (B, k)}``; NaN where a class is absent from a resample (its macro mean is then NaN too)."""
    y = labels[indices]
    called = probs.argmax(axis=1)[indices]
    classes = probs.shape[1]
    per = {name: np.empty((len(indices), classes)) for name in PER_CLASS}
    with np.errstate(invalid="ignore", divide="ignore"):
        for k in range(classes):
            positive, yes = y == k, called == k
            n_pos = positive.sum(1)
            per["sensitivity"][:, k] = np.where(n_pos > 0, (positive & yes).sum(1) / n_pos, np.nan)
            n_neg = (~positive).sum(1)
            per["specificity"][:, k] = np.where(n_neg > 0, (~positive & ~yes).sum(1) / n_neg, np.nan)
            per["roc_auc"][:, k] = _ranking_samples(positive, probs[:, k][indices])["roc_auc"]
    macro = {name: per[name].mean(axis=1) for name in PER_CLASS}
    return {"accuracy": (y == called).mean(1), **macro, "per_class": per}


def score_multiclass_with_intervals(labels: np.ndarray, probs: np.ndarray, class_names: list[str], *,
                                    n_bootstrap: int, seed: int, level: float = LEVEL) -> dict:
    """Argmax metrics of (n, k) probabilities with percentile bootstrap intervals (the resamples of
    ``metrics.bootstrap_index_blocks``, as the binary report), the confusion matrix and the class counts.

    Returns:
        ``{"threshold", "decision", "metrics": {macro name: interval}, "per_class": {class: {name: interval}},
        "confusion": {"labels", "matrix"}, "bootstrap"}``.
    """
    from sklearn.metrics import confusion_matrix

    labels, probs = np.asarray(labels, np.int64), np.asarray(probs, np.float64)
    point = point_metrics(labels, probs)
    blocks = [bootstrap_samples(labels, probs, indices)
              for indices in bootstrap_index_blocks(len(labels), n_bootstrap, seed)]
    metrics = {name: percentile_interval(point[name], np.concatenate([b[name] for b in blocks]), level)
               for name in MACRO}
    per_class = {}
    for k, name in enumerate(class_names):
        per_class[name] = {metric: percentile_interval(point["per_class"][metric][k], np.concatenate(
            [b["per_class"][metric][:, k] for b in blocks]), level) for metric in PER_CLASS}
        per_class[name]["images"] = int(np.sum(labels == k))
    matrix = confusion_matrix(labels, probs.argmax(axis=1), labels=list(range(len(class_names))))
    return {"threshold": 0.0, "decision": ARGMAX, "metrics": metrics, "per_class": per_class,
            "confusion": {"labels": list(class_names), "matrix": matrix.tolist()},
            "bootstrap": {"resamples": n_bootstrap, "level": level, "seed": seed, "method": "percentile"}}


def majority_baseline(train_labels: np.ndarray, test_labels: np.ndarray, classes: int) -> dict:
    """Always the training split's majority class: its test accuracy; macro recall 1/k, specificity (k-1)/k
    (on a test set holding every class) and ROC-AUC 0.5 of a constant score."""
    majority = int(np.bincount(np.asarray(train_labels, np.int64), minlength=classes).argmax())
    constant = np.zeros((len(test_labels), classes))
    constant[:, majority] = 1.0
    point = point_metrics(test_labels, constant)
    return {"class_index": majority, "metrics": {name: point[name] for name in MACRO}}


def evaluate_multiclass(cache_path: Path, record: dict, manifest: dict, data_dir: Path, test, scores, parity: dict,
                        probe, assembled, config) -> dict:
    """The report of a multi-class head from ``evaluate.evaluate_cache``'s test scores; writes its files."""
    from featcache.evaluate import report_fields, skipped_test_files, write_atomic, write_report_json
    from featcache.multiclass_html import write_multiclass_html

    names = list(manifest["class_names"])
    scored = score_multiclass_with_intervals(scores.labels, scores.probs, names, n_bootstrap=config.n_bootstrap,
                                             seed=config.seed)
    report = {
        **report_fields(cache_path, record, manifest, data_dir, assembled.weights_sha256),
        "task": "multiclass", "decision": ARGMAX,
        "test": {"images": len(scores.paths), "per_class": {n: int(np.sum(scores.labels == k))
                                                            for k, n in enumerate(names)},
                 "skipped": scores.skipped, "skipped_at_extraction": skipped_test_files(manifest)},
        "at_threshold": scored, "at_0.5": scored,  # both the argmax decision: no threshold with k classes
        "baseline": majority_baseline(test.train_labels, scores.labels, len(names)),
        "parity": parity,
        "probe": _probe(probe, record, scores, names, config),
        "calibration": calibration_with_intervals(scores.labels, scores.probs, n_bootstrap=config.n_bootstrap,
                                                  seed=config.seed),
        **({"post_hoc_calibration": record["calibration"]} if record.get("calibration") else {}),
        "predictions": scores.predictions(),
    }
    run_dir = Path(record["run_dir"])
    _write_plots(run_dir, report, scores.labels, scores.probs)
    write_atomic(run_dir / "report.md", format_multiclass_report(report))
    write_report_json(run_dir, report)
    write_multiclass_html(report, run_dir, cache_path, assembled, data_dir)
    log.info("%s: multi-class report (argmax decision)", manifest["backbone"])
    return report


def _probe(probe, record: dict, scores, names: list[str], config) -> dict | None:
    if probe is None or scores.probe is None:
        return None
    below = record["val_metrics"]["roc_auc"] < probe.val_scores["roc_auc"]
    test_scores = score_multiclass_with_intervals(scores.labels, scores.probe, names,
                                                  n_bootstrap=config.n_bootstrap, seed=config.seed)
    return {"c": probe.c, "validation": probe.val_scores, "test": test_scores, "head_below_probe_on_validation": below}


def _write_plots(run_dir: Path, report: dict, labels: np.ndarray, probs: np.ndarray) -> None:
    from featcache.plots import plot_confidence_reliability, plot_pr, plot_roc, plot_run_trials

    names = report["class_names"]
    present = [k for k in range(len(names)) if 0 < np.sum(labels == k) < len(labels)]
    curves = [(f"{names[k]} vs rest", labels == k, probs[:, k]) for k in present]
    plot_roc(curves, run_dir / "roc.png", f"Test one-vs-rest ROC, {report['backbone']}")
    plot_pr(curves, run_dir / "pr.png", f"Test one-vs-rest precision-recall, {report['backbone']}", no_skill=False)
    plot_confusion_matrix(report["at_threshold"]["confusion"]["matrix"], names, run_dir / "confusion.png",
                          f"Test, argmax, {report['backbone']}")
    plot_confidence_reliability(probs, report["calibration"]["bins"], run_dir / "calibration.png",
                                f"Test, {report['backbone']}")
    plot_run_trials(run_dir, report["backbone"])


def plot_confusion_matrix(matrix: list[list[int]], class_names: list[str], path: Path, title: str) -> Path:
    """A k x k confusion matrix (rows: true class, columns: predicted), counts annotated."""
    from matplotlib.figure import Figure

    from featcache.plots import _save

    counts = np.asarray(matrix)
    k = len(class_names)
    figure = Figure(figsize=(1.2 * k + 2, 1.2 * k + 1.5))
    axes = figure.add_subplot()
    axes.imshow(counts, cmap="Blues")
    axes.set(xticks=range(k), yticks=range(k), xticklabels=class_names, yticklabels=class_names,
             xlabel="predicted", ylabel="true", title=title)
    for i in range(k):
        for j in range(k):
            axes.text(j, i, str(counts[i, j]), ha="center", va="center",
                      color="white" if counts[i, j] > counts.max() / 2 else "black")
    return _save(figure, path)


def format_multiclass_report(report: dict) -> str:
    """report.md of a multi-class head."""
    names, scored = report["class_names"], report["at_threshold"]
    m, test = scored["metrics"], report["test"]
    counts = ", ".join(f"{name} {test['per_class'][name]}" for name in names)
    lines = [f"# {report['backbone']}: {len(names)} classes ({', '.join(names)})", "",
             f"{test['images']} test images ({counts}). "
             "Decision: the class of highest probability (argmax); a decision threshold has no multi-class meaning.",
             "", *macro_table(m, report["validation"], "classes"), "",
             *per_class_table(scored["per_class"], names, "sensitivity (recall)"), "",
             "Confusion matrix (rows: true class, columns: predicted):", "",
             *confusion_table(names, scored["confusion"]["matrix"])]
    base, probe = report["baseline"], report.get("probe")
    lines += ["", f"Majority-class baseline (always {names[base['class_index']]}): test accuracy "
              f"{format_value(base['metrics']['accuracy'])}, macro ROC-AUC 0.5."]
    if probe:
        lines.append(probe_sentence(probe, "multinomial logistic regression"))
    lines += ["", *calibration_lines(report), ""]
    lines += [parity_sentence(report["parity"]), "",
              "Plots: [roc.png](roc.png) and [pr.png](pr.png) (one vs rest), [confusion.png](confusion.png), [calibration.png](calibration.png) "
              "(top-class confidence), [trials.png](trials.png).", ""]
    return "\n".join(lines)


def per_class_table(per_class: dict, names: list[str], recall: str) -> list[str]:
    """A multi-class head's Markdown table of each class's images, ROC-AUC, sensitivity (headed ``recall``) and
    specificity, with intervals (report.md and MODEL_CARD.md)."""
    return markdown_table(["class", "images", "ROC-AUC (one vs rest)", recall, "specificity"],
                          [[name, per_class[name]["images"], *(format_ci(per_class[name][m]) for m in PER_CLASS)]
                           for name in names], "lr")


def confusion_table(names: list[str], matrix: list[list[int]]) -> list[str]:
    """The k x k confusion matrix as a Markdown table (rows: true class, columns: predicted)."""
    return markdown_table(["true \\ predicted", *names], [[name, *row] for name, row in zip(names, matrix)],
                          "l" + "r" * len(names))


def calibration_lines(report: dict) -> list[str]:
    """Markdown lines: the test calibration of the top-class confidence, and the post-hoc temperature fitted on
    validation (its NLL, Brier score and ECE before and after), when there is one."""
    from featcache.posthoc import describe_calibration

    calibration, lines = report.get("calibration"), []
    if calibration:
        m = calibration["metrics"]
        lines += [f"Calibration on test ({calibration['n_bins']} equal-width bins of the top-class confidence): "
                  f"expected calibration error {format_ci(m['ece'])}, multi-class Brier score {format_ci(m['brier'])} "
                  f"(sum over classes, 0 to 2), negative log-likelihood {format_ci(m['nll'])}."]
    record = report.get("post_hoc_calibration")
    if record:
        before, after = record["validation_before"], record["validation_after"]
        lines += [f"Post-hoc calibration: {describe_calibration(record)}; validation Brier score "
                  f"{before['brier']:.4f} -> {after['brier']:.4f}. The model outputs the calibrated probabilities."]
    return lines
