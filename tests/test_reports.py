"""Markdown of a report and of the comparison: every number comes from the report dict."""

import numpy as np

from featcache.calibration import calibration_with_intervals
from featcache.metrics import majority_baseline, score_with_intervals
from featcache.reports import format_comparison, format_report, format_summary


def fake_report(backbone: str, val_auc: float, test_probs_quality: float, seed: int = 0) -> dict:
    """A report dict as ``evaluate`` builds it, from synthetic test labels and probabilities."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    probs = np.clip(test_probs_quality * labels + (1 - test_probs_quality) * rng.random(60), 0, 1)
    return {
        "backbone": backbone, "cache_file": f"{backbone}-0123456789ab.h5", "cache_fingerprint": "0123456789ab" * 5,
        "run_dir": f"/cache/runs/{backbone}-0123456789ab",
        "image_size": 64, "dtype": "float16", "class_names": ["NORMAL", "PNEUMONIA"],
        "weights": {"source": "random", "sha256": "ab" * 32, "verified_sha256": "ab" * 32},
        "head": {"head_sha256": f"{seed:064x}", "trial_number": 3, "params": {"units": 64}, "threshold": 0.42,
                 "threshold_method": "youden", "study_name": backbone},
        "validation": {"roc_auc": val_auc, "loss": 0.4, "accuracy": 0.8},
        "data_dir": "/data", "test": {"images": 60, "positives": int(labels.sum()), "negatives": int(60 - labels.sum()),
                                      "skipped": [], "skipped_at_extraction": []},
        "at_threshold": score_with_intervals(labels, probs, 0.42, n_bootstrap=50),
        "at_0.5": score_with_intervals(labels, probs, 0.5, n_bootstrap=50),
        "baseline": majority_baseline(np.ones(10), labels),
        "calibration": calibration_with_intervals(labels, probs, n_bootstrap=50),
        "parity": {"images": 60, "max_abs_diff": 1.2e-4, "mean_abs_diff": 3e-5, "tolerance": 1e-3, "worst": "x"},
        "predictions": {"path": [f"test/{i}.jpeg" for i in range(60)], "label": labels.tolist(),
                        "probability": probs.tolist(), "cached_probability": probs.tolist()},
    }


def test_report_markdown_shows_metrics_with_intervals():
    report = fake_report("vgg16", 0.9, 0.6)
    text = format_report(report)
    acc = report["at_threshold"]["metrics"]["accuracy"]
    assert f"{acc['value']:.3f} [{acc['ci_low']:.3f}, {acc['ci_high']:.3f}]" in text
    for label in ("Sensitivity (recall of PNEUMONIA)", "Specificity", "Precision", "F1", "ROC-AUC", "PR-AUC",
                  "majority baseline (PNEUMONIA)", "Confusion matrix at 0.5", "parity", "1.20e-04",
                  "## Calibration on test", "expected calibration error"):
        assert label in text, label
    c = report["at_threshold"]["confusion"]
    assert f"| PNEUMONIA | {c['fn']} | {c['tp']} |" in text


def test_comparison_names_the_selection_and_lists_each_backbone():
    reports = [fake_report("vgg16", 0.95, 0.2, seed=1), fake_report("resnet152", 0.90, 0.9, seed=2)]
    selection = {"backbone": "vgg16", "cache_file": reports[0]["cache_file"], "criterion": "highest val AUC",
                 "candidates": [{"cache_file": r["cache_file"], "val_roc_auc": r["validation"]["roc_auc"]}
                                for r in reports]}
    text = format_comparison(reports, selection)
    assert "Selected for export: **vgg16**" in text and "| vgg16 (selected) | 0.950 |" in text
    assert "| resnet152 | 0.900 |" in text and "Test Accuracy" in text
    assert "selected vgg16" in format_summary(reports, selection)


def _with_probe(report: dict, val_auc: float, seed: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    labels = np.array(report["predictions"]["label"])
    probs = np.clip(0.7 * labels + 0.3 * rng.random(len(labels)), 0, 1)
    return {**report, "probe": {"c": 0.1, "validation": {"roc_auc": val_auc},
                                "test": score_with_intervals(labels, probs, 0.5, n_bootstrap=50),
                                "head_below_probe_on_validation": report["validation"]["roc_auc"] < val_auc}}


def test_probe_floor_is_shown_beside_the_head_and_a_head_below_it_is_called_out():
    above = _with_probe(fake_report("vgg16", 0.95, 0.6, seed=1), 0.90)
    below = _with_probe(fake_report("resnet152", 0.70, 0.6, seed=2), 0.98)
    auc = below["probe"]["test"]["metrics"]["roc_auc"]
    text = format_report(below)
    assert "linear probe at 0.5" in text and f"{auc['value']:.3f} [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}]" in text
    assert "the tuned head is below the linear probe on validation" in text
    assert "below the linear probe" not in format_report(above)
    selection = {"backbone": "vgg16", "cache_file": above["cache_file"], "criterion": "highest val AUC",
                 "candidates": []}
    comparison = format_comparison([above, below], selection)
    assert "| Probe Val ROC-AUC | Probe Test ROC-AUC |" in comparison
    assert "below the linear probe on validation for resnet152." in comparison
    no_probe = format_report(fake_report("vgg16", 0.9, 0.6))  # a head from an older featcache
    assert "Linear probe: none for this head" in no_probe


def test_markdown_table_aligns_the_columns_it_is_told_to_and_writes_each_cell_as_str():
    from featcache.reports import markdown_table

    lines = markdown_table(["class", "images", "ROC-AUC"], [["A", 3, "0.900 [0.8, 1.0]"], ["B", 0, None]], "lr")
    assert lines == ["| class | images | ROC-AUC |", "| --- | ---: | --- |", "| A | 3 | 0.900 [0.8, 1.0] |",
                     "| B | 0 | None |"]
    assert markdown_table(["a", "b"], []) == ["| a | b |", "| --- | --- |"]
