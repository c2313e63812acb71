"""The model card of a multi-label export: model.json carries every label with its threshold and its test metrics;
MODEL_CARD.md renders them.

model.json keeps the binary card's required fields so ``predict``, ``verify`` and ``export --force`` read it as
any card: ``threshold`` 0 (``multilabel.PER_LABEL_THRESHOLD``, unused) and ``positive_class`` ``"(per label)"``;
the decision is ``thresholds`` (one per label, in ``class_names`` order). ``task`` ``"multilabel"`` is what
readers dispatch on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.cardtext import (DATASET_NOTE, _reproduce_lines, backbone_line, macro_metric_lines, title_lines,
                                training_data_lines)
from featcache.modelcard import CARD_DIGEST, seal_card
from featcache.multilabel import PER_LABEL_THRESHOLD
from featcache.reports import format_ci, format_value

PER_LABEL_POSITIVE = "(per label)"
NO_LABEL = ""  # the SavedModel's ``label`` of an image with no label at or above its threshold


def label_counts(cache_path: str | Path) -> dict:
    """Per split and label: positives and known (unmasked) original images, from the cache's /targets."""
    from featcache.cache import open_cache, read_manifest
    from featcache.checksums import read_checked
    from featcache.data import SPLIT_CODES

    names = read_manifest(cache_path)["class_names"]
    with open_cache(cache_path) as handle:
        split = read_checked(handle, "split")
        original = read_checked(handle, "copy_index", split) == 0
        targets = read_checked(handle, "targets", split)
    out = {}
    for name, code in SPLIT_CODES.items():
        rows = targets[original & (split == code)]
        out[name] = {label: {"positives": int(np.sum(rows[:, j] == 1)), "known": int(np.isfinite(rows[:, j]).sum())}
                     for j, label in enumerate(names)}
    return out


def multilabel_card(card: dict, report: dict, cache_path: str | Path) -> dict:
    """The sealed binary card of ``export.model_card`` made a multi-label one, sealed again."""
    names = card["class_names"]
    scored = report["at_threshold"]
    card = {key: value for key, value in card.items() if key != CARD_DIGEST}
    card.update({
        "task": "multilabel", "decision": "per-label thresholds", "positive_class": PER_LABEL_POSITIVE,
        "threshold": PER_LABEL_THRESHOLD, "thresholds": scored["thresholds"],
        "labels": [{"name": name, "threshold": scored["per_label"][name]["threshold"],
                    "test": {metric: scored["per_label"][name][metric]
                             for metric in ("roc_auc", "sensitivity", "specificity", "accuracy")},
                    "test_positives": scored["per_label"][name]["positives"],
                    "test_known": scored["per_label"][name]["positives"] + scored["per_label"][name]["negatives"],
                    "validation_roc_auc": card["validation_metrics"]["per_label_roc_auc"][j]}
                   for j, name in enumerate(names)],
        "training_data": {**card["training_data"], "labels": label_counts(cache_path)},
    })
    card["files"] = {**card["files"], "outputs": {
        "probability": f"(None, {len(names)}) float32, P(label) in the order of class_names {names}",
        "label": "(None,) tf.string, the labels at or above their thresholds, comma-separated ('' when none)"}}
    return seal_card(card)


def render_multilabel_card(card: dict) -> str:
    """MODEL_CARD.md of a multi-label ``model.json``."""
    names, data = card["class_names"], card.get("training_data") or {}
    lines = [*title_lines(card, "labels"),
             "## Intended use", "",
             f"Research and teaching: a transfer-learning baseline that gives a chest X-ray image an independent "
             f"probability for each of {', '.join(names)} and calls each label at its own threshold. **Not a medical "
             "device**; not for diagnosis, triage or any decision about a patient.", "",
             "## Model", "",
             backbone_line(card),
             f"- Head: {len(names)} sigmoid outputs (one per label, masked binary cross-entropy), trial "
             f"{card['head']['trial_number']} of study `{card['head']['study_name']}`, parameters "
             f"`{card['head']['params']}`.",
             f"- Decision: each label at its own threshold ({card['threshold_method']}, chosen on validation); "
             "`threshold` in model.json is 0 and unused, `thresholds` holds them.", "",
             "## Training data", ""]
    counts = data.get("labels")
    if counts:
        lines += training_data_lines(
            card, lambda split: [f"{counts[split][n]['positives']} / {counts[split][n]['known']}" for n in names],
            heading=" Positives / known (uncertain or blank entries are masked) per split:")
    lines += macro_metric_lines(card, "labels")
    lines += ["", "| label | threshold | positives / known | ROC-AUC | sensitivity | specificity | validation ROC-AUC |",
              "| --- | ---: | ---: | --- | --- | --- | ---: |"]
    for label in card["labels"]:
        t = label["test"]
        lines.append(f"| {label['name']} | {label['threshold']:.4f} | {label['test_positives']} / {label['test_known']} "
                     f"| {format_ci(t['roc_auc'])} | {format_ci(t['sensitivity'])} | {format_ci(t['specificity'])} | "
                     f"{format_value(label['validation_roc_auc'])} |")
    floors = card.get("floors") or {}
    probe = floors.get("linear_probe")
    lines += ["", f"Floors: each label's training majority scores test macro accuracy "
              f"{format_value((floors.get('majority_baseline') or {}).get('accuracy'))} (ROC-AUC 0.5)"
              + (f"; the per-label linear probe validation macro ROC-AUC {format_value(probe['val_roc_auc'])}, test "
                 f"{format_ci(probe['test_roc_auc'])}" if probe else "") + ".",
              "", "## Known limitations", "", f"- {DATASET_NOTE}",
              "- Probabilities were not calibrated (calibration is reported for binary heads only).",
              "- Uncertain and blank labels were masked (`--uncertain ignore`) or resolved as the cache's policy says; "
              "metrics count only the known entries.", ""]
    return "\n".join(lines + _reproduce_lines(card))
