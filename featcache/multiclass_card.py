"""The model card of a multi-class export: model.json carries every class name, the argmax decision, the
per-class test metrics and the confusion matrix; MODEL_CARD.md renders them.

model.json keeps the binary card's required fields so ``predict``, ``verify`` and ``export --force`` read it
as any card: ``threshold`` 0 with ``threshold_method`` ``"argmax"`` (unused) and ``positive_class``
``"(argmax)"`` (there is none). ``task`` ``"multiclass"`` is what readers dispatch on.
"""

from __future__ import annotations

from featcache.cardtext import (DATASET_NOTE, _reproduce_lines, backbone_line, macro_metric_lines, title_lines,
                                training_data_lines)
from featcache.modelcard import CARD_DIGEST, seal_card
from featcache.multiclass import ARGMAX, ARGMAX_THRESHOLD
from featcache.multiclass_eval import confusion_table, per_class_table
from featcache.reports import format_ci, format_value

NO_POSITIVE_CLASS = "(argmax)"


def multiclass_card(card: dict, report: dict) -> dict:
    """The sealed binary card of ``export.model_card`` made a multi-class one, sealed again."""
    names = card["class_names"]
    scored = report["at_threshold"]
    card = {key: value for key, value in card.items() if key != CARD_DIGEST}
    card.update({
        "task": "multiclass", "decision": ARGMAX, "positive_class": NO_POSITIVE_CLASS,
        "threshold": ARGMAX_THRESHOLD, "threshold_method": ARGMAX,
        # the binary card's keys (read by the CLI summary and verify), both holding the argmax results
        "test_metrics": {key: {name: m["value"] for name, m in scored["metrics"].items()}
                         for key in ("at_threshold", "at_0.5")},
        "test_metrics_ci": {key: scored["metrics"] for key in ("at_threshold", "at_0.5")},
        "test_per_class": scored["per_class"],
        "test_confusion": scored["confusion"],
    })
    card["files"] = {**card["files"], "outputs": {
        "probability": f"(None, {len(names)}) float32, P(class) in the order of class_names {names}",
        "label": "(None,) tf.string, the class of highest probability (argmax)"}}
    return seal_card(card)


def render_multiclass_card(card: dict) -> str:
    """MODEL_CARD.md of a multi-class ``model.json``."""
    names, data = card["class_names"], card.get("training_data") or {}
    lines = [
        *title_lines(card, "classes"),
        "## Intended use", "",
        f"Research and teaching: a transfer-learning baseline that gives a chest X-ray image a probability for each "
        f"of {', '.join(names)} and labels it with the most probable. **Not a medical device**; not for diagnosis, "
        "triage or any decision about a patient.", "",
        "## Model", "",
        backbone_line(card),
        f"- Head: softmax over {len(names)} classes, trial {card['head']['trial_number']} of study "
        f"`{card['head']['study_name']}`, parameters `{card['head']['params']}`.",
        "- Decision: the class of highest probability (argmax). A decision threshold has no multi-class meaning; "
        "`threshold` in model.json is 0 and unused.", "",
        "## Training data", "",
    ]
    if data:
        lines += training_data_lines(card, lambda split: [data["images"][split].get(n, 0) for n in names])
    lines += [*macro_metric_lines(card, "classes"), "",  # the argmax decision
              *per_class_table(card["test_per_class"], names, "sensitivity"), "",
              "Confusion matrix (rows: true, columns: predicted):", "",
              *confusion_table(names, card["test_confusion"]["matrix"])]
    lines += ["", f"Validation macro ROC-AUC {format_value(card['validation_metrics'].get('roc_auc'))} (the split "
              "the head was chosen on).", *calibration_card_lines(card), "", "## Known limitations", "",
              f"- {DATASET_NOTE}",
              "- Probabilities are calibrated only as far as the calibration figures above say, on this test set.", ""]
    return "\n".join(lines + _reproduce_lines(card))


def calibration_card_lines(card: dict) -> list[str]:
    """The test calibration of the top-class confidence, and the temperature fitted on validation."""
    from featcache.posthoc import describe_calibration

    lines, calibration = [], card.get("calibration")
    if calibration:
        lines += ["", f"Calibration on test (top-class confidence, 10 equal-width bins): expected calibration error "
                  f"{format_ci(calibration['ece'])}, multi-class Brier score {format_ci(calibration['brier'])}, "
                  f"negative log-likelihood {format_ci(calibration.get('nll'))}."]
    record = card.get("post_hoc_calibration") or {}
    if record.get("method", "none") != "none":
        lines += ["", f"Post-hoc calibration: {describe_calibration(record)}; validation Brier score "
                  f"{record['validation_before']['brier']:.4f} -> {record['validation_after']['brier']:.4f}. The "
                  "exported model outputs the temperature-scaled probabilities (T folded into its last layer; the "
                  "argmax is unchanged)."]
    return lines
