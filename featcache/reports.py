"""Markdown renderings of evaluation reports: one backbone's report.md and the cross-backbone
comparison.md. Pure string formatting of the dicts ``evaluate`` builds."""

from __future__ import annotations

import math
from pathlib import Path

from featcache.metrics import METRICS

LABELS = {"accuracy": "Accuracy", "sensitivity": "Sensitivity (recall of {pos})", "specificity": "Specificity",
          "precision": "Precision", "f1": "F1", "roc_auc": "ROC-AUC", "pr_auc": "PR-AUC (average precision)"}


def format_value(value, digits: int = 3) -> str:
    """A metric for a table: ``digits`` decimals, "n/a" for None or NaN."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_ci(entry: dict | None) -> str:
    """``{"value", "ci_low", "ci_high"}`` as "value [low, high]" ("n/a" for none)."""
    if not entry:
        return "n/a"
    return f"{format_value(entry['value'])} [{format_value(entry['ci_low'])}, {format_value(entry['ci_high'])}]"


_num, _ci = format_value, format_ci  # the short names of this module's tables

MACRO = ("accuracy", "roc_auc", "sensitivity", "specificity")  # a multi-class or multi-label head's macro means


def markdown_table(header: list[str], rows: list[list], align: str = "") -> list[str]:
    """A Markdown table's lines: the header, its rule and a line per row (each cell as ``str`` writes it).
    ``align`` holds a letter per column, "l" (``---``) or "r" (``---:``); columns past its end are "l"."""
    rule = ["---:" if letter == "r" else "---" for letter in align.ljust(len(header), "l")]
    return ["| " + " | ".join(map(str, cells)) + " |" for cells in (header, rule, *rows)]


def macro_table(metrics: dict, validation: dict, over: str) -> list[str]:
    """report.md's table of a multi-class or multi-label head's macro metrics (``over`` "classes" or "labels"):
    test with intervals beside validation."""
    return markdown_table([f"metric (macro over {over})", "test [95 % bootstrap CI]", "validation"],
                          [[name, _ci(metrics[name]), _num(validation.get(name))] for name in MACRO], "llr")


def probe_sentence(probe: dict, fitted: str) -> str:
    """report.md's sentence on the linear probe of a multi-class or multi-label head (``fitted``: what it is)."""
    return (f"Linear probe ({fitted}, C={probe['c']:g}): validation macro ROC-AUC {_num(probe['validation']['roc_auc'])}, "
            f"test {_ci(probe['test']['metrics']['roc_auc'])}"
            + (" -- **the tuned head is below it on validation**" if probe["head_below_probe_on_validation"] else "")
            + ".")


def parity_sentence(parity: dict) -> str:
    """report.md's sentence on the end-to-end model against the head on cached maps (multi-class, multi-label)."""
    return (f"Parity: end-to-end vs cached-maps probabilities differ by at most {parity['max_abs_diff']:.2e} "
            f"(tolerance {parity['tolerance']:g}).")


def _confusion(confusion: dict, names: list[str]) -> list[str]:
    return [
        f"| true \\ predicted | {names[0]} | {names[1]} |", "| --- | ---: | ---: |",
        f"| {names[0]} | {confusion['tn']} | {confusion['fp']} |",
        f"| {names[1]} | {confusion['fn']} | {confusion['tp']} |",
    ]


def format_report(report: dict) -> str:
    """report.md of one backbone."""
    names, test = report["class_names"], report["test"]
    at_t, at_half, base = report["at_threshold"], report["at_0.5"], report["baseline"]
    boot = at_t["bootstrap"]
    head, parity = report["head"], report["parity"]
    lines = [
        f"# Evaluation: {report['backbone']}", "",
        f"- cache `{report['cache_file']}` (fingerprint `{report['cache_fingerprint'][:12]}`, {report['dtype']} maps, "
        f"{report['image_size']} px)",
        f"- backbone weights: {report['weights']['source']}, SHA-256 `{report['weights']['verified_sha256'][:16]}` "
        "(verified against the cache)",
        f"- head: trial {head['trial_number']} of study `{head['study_name']}`, parameters `{head['params']}`",
        f"- threshold {head['threshold']:.4f} ({head['threshold_method']}, chosen on validation)",
        f"- test images: {test['images']} ({test['positives']} {names[1]}, {test['negatives']} {names[0]}) from "
        f"`{report['data_dir']}`, read from their raw files",
        f"- parity: max |end-to-end - head(cached maps)| = {parity['max_abs_diff']:.2e} over {parity['images']} "
        f"images (tolerance {parity['tolerance']:g})", "",
        f"## Test metrics (95 % bootstrap CI, {boot['resamples']} resamples of the test images)", "",
        f"| metric | at threshold {at_t['threshold']:.3f} | at 0.5 | linear probe at 0.5 | majority baseline "
        f"({names[base['class_index']]}) |",
        "| --- | --- | --- | --- | --- |",
    ]
    probe = report.get("probe")
    for name in METRICS:
        label = LABELS[name].format(pos=names[1])
        floor = _ci(probe["test"]["metrics"][name]) if probe else "n/a"
        lines.append(f"| {label} | {_ci(at_t['metrics'][name])} | {_ci(at_half['metrics'][name])} | {floor} | "
                     f"{_num(base['metrics'][name])} |")
    lines += ["", f"Validation (the head's own split): ROC-AUC {_num(report['validation']['roc_auc'])}, "
              f"accuracy {_num(report['validation']['accuracy'])} at the threshold.", "", *_probe_lines(report), "",
              *_calibration_lines(report), *posthoc_lines(report), f"## Confusion matrix at threshold {at_t['threshold']:.3f}", ""]
    lines += _confusion(at_t["confusion"], names)
    lines += ["", "## Confusion matrix at 0.5", ""] + _confusion(at_half["confusion"], names)
    skipped = test["skipped"] + test["skipped_at_extraction"]
    if skipped:
        lines += ["", "## Skipped test images", ""] + [f"- `{s['path']}`: {s['error']}" for s in skipped]
    lines += ["", "Plots: [ROC](roc.png), [precision-recall](pr.png), [confusion matrices](confusion.png), "
              "[calibration](calibration.png), "
              "[trial history](trials.png).", ""]
    return "\n".join(lines)


def _calibration_lines(report: dict) -> list[str]:
    """The head's calibration on test: Brier score and ECE with intervals, and the reliability bins."""
    calibration = report.get("calibration")
    if not calibration:
        return []
    names, metrics = report["class_names"], calibration["metrics"]
    lines = [f"## Calibration on test ({calibration['n_bins']} equal-width bins of the probability of {names[1]})", "",
             f"Brier score {_ci(metrics['brier'])} (0 is perfect; always answering the test prevalence scores "
             f"{_num(_prevalence_brier(report))}); expected calibration error {_ci(metrics['ece'])}.", "",
             f"| probability bin | images | mean probability | fraction {names[1]} |", "| --- | --- | --- | --- |"]
    lines += [f"| {b['low']:.1f}-{b['high']:.1f} | {b['count']} | {_num(b['mean_prob'])} | "
              f"{_num(b['fraction_positive'])} |" for b in calibration["bins"] if b["count"]]
    return lines + [""]


def posthoc_lines(report: dict) -> list[str]:
    """The post-hoc calibration fitted on validation (``train-head --calibrate``), and for a lookup applied
    outside the model (isotonic) the calibration of the looked-up test probabilities."""
    from featcache.posthoc import describe_calibration

    record = report.get("post_hoc_calibration")
    if not record:
        return []
    lines = ["## Post-hoc calibration (fitted on validation)", "", describe_calibration(record) + ".", ""]
    if record["method"] == "temperature":
        lines += ["The model's own output (and every test figure above) is the temperature-scaled probability.", ""]
    calibrated = report.get("calibrated")
    if calibrated:
        metrics = calibrated["metrics"]
        lines += [f"The model outputs the uncalibrated score (the figures above); the calibrated probability is the "
                  f"{record['method']} lookup of it (`calibrated_probability` in report.json). On test: Brier score "
                  f"{_ci(metrics['brier'])}, expected calibration error {_ci(metrics['ece'])} "
                  "([reliability](calibration-calibrated.png)).", ""]
    return lines


def _prevalence_brier(report: dict) -> float:
    """The Brier score of the constant answer p = test prevalence: p (1 - p), a floor for the Brier score."""
    test = report["test"]
    prevalence = test["positives"] / max(1, test["images"])
    return prevalence * (1 - prevalence)


def _probe_lines(report: dict) -> list[str]:
    """What the linear probe (the floor a head must clear) says, in a sentence or two."""
    probe = report.get("probe")
    if not probe:
        return ["Linear probe: none for this head (trained by an older featcache); re-run 'featcache train-head'."]
    lines = [f"Linear probe (standardized logistic regression on the same cached pooled vectors, C={probe['c']:g}; "
             f"never selected or exported): validation ROC-AUC {_num(probe['validation']['roc_auc'])}, test ROC-AUC "
             f"{_ci(probe['test']['metrics']['roc_auc'])}."]
    if probe["head_below_probe_on_validation"]:
        lines.append(f"**Warning: the tuned head is below the linear probe on validation** (ROC-AUC "
                     f"{_num(report['validation']['roc_auc'])} < {_num(probe['validation']['roc_auc'])}).")
    return lines


def format_comparison(reports: list[dict], selection: dict) -> str:
    """comparison.md: a table per backbone; the selection is by validation ROC-AUC."""
    lines = [
        "# Backbone comparison", "",
        f"Selected for export: **{selection['backbone']}** (`{selection['cache_file']}`): {selection['criterion']}.", "",
        "| Backbone | Val ROC-AUC | Threshold | Test Accuracy | Test Accuracy at 0.5 | Test ROC-AUC | Sensitivity "
        "| Specificity | Brier | ECE | Probe Val ROC-AUC | Probe Test ROC-AUC |",
        "| --- | ---: | ---: | --- | --- | --- | --- | --- | --- | --- | ---: | --- |",
    ]
    below = []
    for report in sorted(reports, key=lambda r: r["cache_file"]):
        m, half = report["at_threshold"]["metrics"], report["at_0.5"]["metrics"]
        mark = " (selected)" if report["cache_file"] == selection["cache_file"] else ""
        probe = report.get("probe")
        floor = (f"{_num(probe['validation']['roc_auc'])} | {_ci(probe['test']['metrics']['roc_auc'])}"
                 if probe else "n/a | n/a")
        calibration = report.get("calibration")
        calibrated = (f"{_ci(calibration['metrics']['brier'])} | {_ci(calibration['metrics']['ece'])}"
                      if calibration else "n/a | n/a")
        lines.append(f"| {report['backbone']}{mark} | {_num(report['validation']['roc_auc'])} | "
                     f"{_threshold_cell(report)} | {_ci(m['accuracy'])} | {_ci(half['accuracy'])} | "
                     f"{_ci(m['roc_auc'])} | {_ci(m['sensitivity'])} | {_ci(m['specificity'])} | {calibrated} | {floor} |")
        if probe and probe["head_below_probe_on_validation"]:
            below.append(report["backbone"])
    if reports and reports[0].get("task") == "multilabel":
        lines += ["", f"Majority baseline (each label's training majority): test macro accuracy "
                  f"{_num(reports[0]['baseline']['metrics']['accuracy'])}, ROC-AUC 0.5."]
    elif reports:
        base, names = reports[0]["baseline"], reports[0]["class_names"]
        lines += ["", f"Majority-class baseline (always {names[base['class_index']]}, the training majority): test "
                  f"accuracy {_num(base['metrics']['accuracy'])}, sensitivity {_num(base['metrics']['sensitivity'])}, "
                  f"specificity {_num(base['metrics']['specificity'])}."]
    lines += ["", "Probe: the linear probe (standardized logistic regression on the same cached pooled vectors), the "
              "floor a tuned head must clear; it is never selected or exported."]
    if below:
        lines.append(f"**Warning: the tuned head is below the linear probe on validation for {', '.join(below)}.**")
    lines += ["", "Sensitivity and specificity at each head's validation-chosen threshold; brackets: 95 % bootstrap "
              "CI. Brier score and expected calibration error (ECE, 10 equal-width bins) of the test probabilities: lower is "
              "better. ROC curves: [roc.png](roc.png).", ""]
    return "\n".join(lines)


def _threshold_cell(report: dict) -> str:
    """comparison.md's (and report.html's) threshold: the head's, "per label" for a multi-label head (its
    thresholds: report.md), "argmax" for a multi-class one."""
    if report.get("task") == "multilabel":
        return "per label"
    if report.get("task") == "multiclass":
        return "argmax"
    return f"{report['at_threshold']['threshold']:.3f}"


def format_summary(reports: list[dict], selection: dict) -> str:
    """What ``featcache evaluate`` prints: one block per backbone and the selection."""
    lines = []
    for r in reports:
        m = r["at_threshold"]["metrics"]
        multiclass = r.get("task") == "multiclass"  # argmax decision; macro ROC-AUC, sensitivity, specificity
        multilabel = r.get("task") == "multilabel"  # per-label thresholds; macro over labels, then each label
        lines += [
            f"{r['backbone']}: {r['test']['images']} test images, "
            + (f"{len(r['class_names'])} classes, argmax (macro): " if multiclass else
               f"{len(r['class_names'])} labels, per-label thresholds (macro): " if multilabel else
               f"threshold {r['at_threshold']['threshold']:.3f}: ") +
            f"accuracy {_ci(m['accuracy'])}, ROC-AUC {_ci(m['roc_auc'])}, sensitivity {_num(m['sensitivity']['value'])}, "
            f"specificity {_num(m['specificity']['value'])}",
            ("  " if multiclass else f"  at 0.5: {'macro ' if multilabel else ''}accuracy "
             f"{_num(r['at_0.5']['metrics']['accuracy']['value'])}; ")
            + f"majority baseline accuracy {_num(r['baseline']['metrics']['accuracy'])}; parity max diff "
            f"{r['parity']['max_abs_diff']:.2e}",
        ]
        if multilabel:
            lines += [f"    {name}: threshold {c['threshold']:.3f}, ROC-AUC {_ci(c['roc_auc'])}, sensitivity "
                      f"{_num(c['sensitivity']['value'])}, specificity {_num(c['specificity']['value'])}"
                      for name, c in r["at_threshold"]["per_label"].items()]
        probe = r.get("probe")
        if probe:
            lines.append(f"  linear probe (floor): test ROC-AUC {_ci(probe['test']['metrics']['roc_auc'])}, val ROC-AUC "
                         f"{_num(probe['validation']['roc_auc'])}"
                         + ("; the tuned head is BELOW it on validation" if probe["head_below_probe_on_validation"]
                            else ""))
        if r["test"]["skipped"]:
            lines.append(f"  skipped {len(r['test']['skipped'])} unreadable test images: "
                         + ", ".join(s["path"] for s in r["test"]["skipped"]))
        lines.append(f"  report {r['run_dir']}/report.md")
    chosen = next(c for c in selection["candidates"] if c["cache_file"] == selection["cache_file"])
    lines.append(f"selected {selection['backbone']} ({selection['cache_file']}) by validation ROC-AUC "
                 f"{chosen['val_roc_auc']:.4f}, the default of 'featcache export'")
    if reports:
        lines.append(f"comparison {Path(reports[0]['run_dir']).parent / 'comparison.md'}")
    return "\n".join(lines)
