"""Test-set evaluation of a multi-label head (several 0/1 labels, Dense(k, sigmoid)): each label decided at its
own validation-chosen threshold (head.json ``thresholds``); per-label ROC-AUC, sensitivity and specificity with
percentile bootstrap intervals, their macro means, per-label ROC curves, and report.json / report.md / roc.png /
trials.png in the run folder.

Masked entries (``--uncertain ignore``: NaN targets) take no part anywhere: a label's metrics are computed on the
images where that label is known, in every bootstrap resample too (resamples draw images, as the binary
report does, and each label then uses the known entries of the drawn images). report.json keeps the keys the
selection, export and the summaries read: ``at_threshold`` (per-label thresholds) and ``at_0.5``, each with
macro ``metrics`` and ``per_label``. Calibration and the HTML report are binary-only and are not written.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from featcache.metrics import LEVEL, bootstrap_index_blocks, percentile_interval
from featcache.multilabel import majority_floor
from featcache.reports import MACRO, format_ci, format_value, macro_table, parity_sentence, probe_sentence

log = logging.getLogger(__name__)

PER_LABEL = ("accuracy", "roc_auc", "sensitivity", "specificity")


def sample_metrics(targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, indices: np.ndarray) -> dict:
    """Each label's metrics on each resample (rows of ``indices``, (B, n) image indices), on the known entries
    of the drawn images only: ``{name: (B, k)}``; NaN where a resample lacks a 0 or a 1 of a label."""
    targets, probs = np.asarray(targets, np.float64), np.asarray(probs, np.float64)
    from scipy.stats import rankdata

    b, k = len(indices), targets.shape[1]
    out = {name: np.full((b, k), np.nan) for name in PER_LABEL}
    with np.errstate(invalid="ignore", divide="ignore"):
        for j in range(k):
            t, p = targets[indices, j], probs[indices, j]
            known = np.isfinite(t)
            y = known & (np.nan_to_num(t) == 1)
            neg = known & ~y
            called = p >= thresholds[j]
            n_pos, n_neg = y.sum(1), neg.sum(1)
            out["accuracy"][:, j] = ((y & called) | (neg & ~called)).sum(1) / known.sum(1)
            out["sensitivity"][:, j] = np.where(n_pos > 0, (y & called).sum(1) / n_pos, np.nan)
            out["specificity"][:, j] = np.where(n_neg > 0, (neg & ~called).sum(1) / n_neg, np.nan)
            # Mann-Whitney U among the known entries: masked ones ranked above every score change no known rank
            ranks = rankdata(np.where(known, p, np.inf), axis=1, method="average")
            auc = ((ranks * y).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
            out["roc_auc"][:, j] = np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)
    return out


def score_multilabel_with_intervals(targets: np.ndarray, probs: np.ndarray, thresholds, label_names: list[str], *,
                                    n_bootstrap: int, seed: int, level: float = LEVEL) -> dict:
    """Per-label and macro metrics of (n, k) probabilities at per-label ``thresholds`` with percentile bootstrap
    intervals (the image resamples of ``metrics.bootstrap_index_blocks``).

    Returns:
        ``{"thresholds", "decision", "metrics": {macro name: interval}, "per_label": {label: {name: interval,
        "threshold", "positives", "negatives", "masked"}}, "bootstrap"}``.
    """
    targets, probs = np.asarray(targets, np.float64), np.asarray(probs, np.float64)
    thresholds = np.asarray(thresholds, np.float64)
    point = sample_metrics(targets, probs, thresholds, np.arange(len(targets))[None, :])
    blocks = [sample_metrics(targets, probs, thresholds, indices)
              for indices in bootstrap_index_blocks(len(targets), n_bootstrap, seed)]
    samples = {name: np.concatenate([b[name] for b in blocks]) for name in PER_LABEL}
    metrics = {name: percentile_interval(np.mean(point[name][0]), samples[name].mean(axis=1), level)
               for name in MACRO}
    per_label = {}
    for j, name in enumerate(label_names):
        known = np.isfinite(targets[:, j])
        per_label[name] = {metric: percentile_interval(point[metric][0, j], samples[metric][:, j], level)
                           for metric in PER_LABEL}
        per_label[name].update(threshold=float(thresholds[j]), positives=int((targets[known, j] == 1).sum()),
                               negatives=int((targets[known, j] == 0).sum()), masked=int((~known).sum()))
    return {"thresholds": thresholds.tolist(), "decision": "per-label thresholds", "metrics": metrics,
            "per_label": per_label,
            "bootstrap": {"resamples": n_bootstrap, "level": level, "seed": seed, "method": "percentile"}}


def evaluate_multilabel(cache_path: Path, record: dict, manifest: dict, data_dir: Path, test, scores, parity: dict,
                        probe, weights_sha256: str, config) -> dict:
    """The report of a multi-label head from ``evaluate.evaluate_cache``'s test scores; writes its files."""
    from featcache.evaluate import HEAD_KEYS, report_fields, skipped_test_files, write_atomic, write_report_json

    names = list(manifest["class_names"])
    thresholds = record["thresholds"]
    score = lambda probs, at: score_multilabel_with_intervals(  # noqa: E731
        scores.labels, probs, at, names, n_bootstrap=config.n_bootstrap, seed=config.seed)
    known = np.isfinite(scores.labels)
    report = {
        **report_fields(cache_path, record, manifest, data_dir, weights_sha256, (*HEAD_KEYS, "thresholds")),
        "task": "multilabel", "decision": "per-label thresholds",
        "test": {"images": len(scores.paths), "masked_entries": int((~known).sum()),
                 "per_label": {n: {"positives": int((scores.labels[known[:, j], j] == 1).sum()),
                                   "known": int(known[:, j].sum())} for j, n in enumerate(names)},
                 "skipped": scores.skipped,
                 "skipped_at_extraction": skipped_test_files(manifest)},
        "at_threshold": score(scores.probs, thresholds), "at_0.5": score(scores.probs, [0.5] * len(names)),
        "baseline": {"metrics": majority_floor(test.train_labels, scores.labels)},
        "parity": parity,
        "probe": _probe(probe, record, scores, names, config),
        "predictions": scores.predictions(),
    }
    run_dir = Path(record["run_dir"])
    _write_plots(run_dir, report, scores.labels, scores.probs)
    write_atomic(run_dir / "report.md", format_multilabel_report(report))
    write_report_json(run_dir, report)
    log.info("%s: multi-label report (per-label thresholds); calibration and report.html are binary-only, not "
             "written", manifest["backbone"])
    return report


def _probe(probe, record: dict, scores, names: list[str], config) -> dict | None:
    if probe is None or scores.probe is None:
        return None
    below = record["val_metrics"]["roc_auc"] < probe.val_scores["roc_auc"]
    test_scores = score_multilabel_with_intervals(scores.labels, scores.probe, [0.5] * len(names), names,
                                                  n_bootstrap=config.n_bootstrap, seed=config.seed)
    return {"c": probe.c, "validation": probe.val_scores, "test": test_scores, "head_below_probe_on_validation": below}


def _write_plots(run_dir: Path, report: dict, targets: np.ndarray, probs: np.ndarray) -> None:
    """roc.png: one ROC curve per label on its known test entries (labels without both values left out)."""
    from featcache.plots import plot_roc, plot_run_trials

    curves = []
    for j, name in enumerate(report["class_names"]):
        known = np.isfinite(targets[:, j])
        if len(np.unique(targets[known, j])) == 2:
            curves.append((name, targets[known, j].astype(np.int64), probs[known, j]))
    plot_roc(curves, run_dir / "roc.png", f"Test ROC per label, {report['backbone']}")
    plot_run_trials(run_dir, report["backbone"])


def format_multilabel_report(report: dict) -> str:
    """report.md of a multi-label head."""
    names, scored = report["class_names"], report["at_threshold"]
    m, test = scored["metrics"], report["test"]
    lines = [f"# {report['backbone']}: {len(names)} labels ({', '.join(names)})", "",
             f"{test['images']} test images; {test['masked_entries']} masked (uncertain or blank) label entries, "
             "left out of every metric. Decision: each label at its own threshold, chosen on validation.", "",
             *macro_table(m, report["validation"], "labels")]
    lines += ["", "| label | threshold | positives / known | ROC-AUC | sensitivity | specificity |",
              "| --- | ---: | ---: | --- | --- | --- |"]
    for name in names:
        c = scored["per_label"][name]
        lines.append(f"| {name} | {c['threshold']:.4f} | {c['positives']} / {c['positives'] + c['negatives']} | "
                     f"{format_ci(c['roc_auc'])} | {format_ci(c['sensitivity'])} | {format_ci(c['specificity'])} |")
    base, probe = report["baseline"]["metrics"], report.get("probe")
    lines += ["", f"Majority baseline (each label's training majority): test macro accuracy "
              f"{format_value(base['accuracy'])}, ROC-AUC 0.5."]
    if probe:
        lines.append(probe_sentence(probe, "one logistic regression per label"))
    lines += [parity_sentence(report["parity"]), "",
              "Plots: [roc.png](roc.png) (one curve per label), [trials.png](trials.png).", ""]
    return "\n".join(lines)
