"""MODEL_CARD.md: the human-readable model card of an export, rendered from ``model.json`` alone.

The Markdown is a pure function of the sealed card (``render_model_card``), so ``verify`` can prove that the
file beside it says what the card says, and nothing in it is computed twice. The facts the card did not hold
before (the training data per split and class, calibration) are gathered at export by ``data_summary`` and
the evaluation report.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np

from featcache.decode import scaled_decode
from featcache.patients import pattern_of_rule
from featcache.reports import MACRO, format_ci as _ci, format_value as _num, markdown_table

DATASET_NOTE = (
    "The Kermany et al. (2018) chest X-ray set is paediatric (patients aged one to five, from one centre in "
    "Guangzhou). Its test folder differs from its training folders (62.5 % pneumonia in test against 74 % in "
    "train, and a test set small enough for wide intervals), so a score on it does not say how the model does "
    "elsewhere: adults, other hospitals, other devices and other diseases are outside what it shows.")


def data_summary(cache_path: str | Path) -> dict:
    """Images per split and class, patients per split, from a cache's file table (one row per file, no maps).

    Returns:
        ``{"images": {split: {class: n}}, "patients": {split: n}, "augmented_copies": n}``.
    """
    from featcache.cache import open_cache, read_manifest
    from featcache.checksums import read_checked
    from featcache.data import SPLIT_CODES

    names = [str(name) for name in read_manifest(cache_path)["class_names"]]
    with open_cache(cache_path) as handle:
        labels = read_checked(handle, "files/label")
        splits = read_checked(handle, "files/split")
        patients = read_checked(handle, "files/patient")
        copies = int((read_checked(handle, "copy_index", read_checked(handle, "split")) > 0).sum())
    patients = np.asarray(patients).astype(str)
    images = {split: {name: int(((splits == code) & (labels == index)).sum()) for index, name in enumerate(names)}
              for split, code in SPLIT_CODES.items()}
    return {"images": images,
            "patients": {split: len(set(patients[splits == code])) for split, code in SPLIT_CODES.items()},
            "augmented_copies": copies}


def extract_command(manifest: dict) -> str:
    """The ``featcache extract`` command line that rebuilds a cache of these settings (same fingerprint when the
    data folder holds the same files)."""
    weights = manifest["weights"]
    source = weights.get("path") or weights["source"]
    return (f"featcache extract --data {manifest['data_dir']} --backbone {manifest['backbone']} --weights {source} "
            f"--image-size {manifest['image_size']} --augment-copies {manifest['augment']['copies']} "
            f"--seed {manifest['seed']} --dtype {manifest['dtype']} --precision {manifest.get('precision', 'float32')}"
            + (f" --feature-layer {manifest['feature_layer']}" if manifest.get("feature_layer") else "")
            + (" --decode fast" if scaled_decode(manifest.get("resize")) else "")
            + _label_options(manifest))


def _label_options(manifest: dict) -> str:
    """The data options beyond the folder: ``--labels`` (none for class folders) and ``--patient-pattern``."""
    options = ""
    labels = manifest.get("labels")
    if labels:
        options += (f" --labels {shlex.quote(labels['file'])} --label-columns {shlex.quote(','.join(labels['columns']))} "
                    f"--uncertain {labels['uncertain']}")
    rules = manifest.get("split", {}).get("patient_rules", [])
    pattern = next((p for p in map(pattern_of_rule, rules) if p is not None), None)
    if pattern is not None:
        options += f" --patient-pattern {shlex.quote(pattern)}"
    return options


def _augment_text(augment: dict | None) -> str:
    if not augment:
        return "n/a"
    return ", ".join(f"{key} {value}" for key, value in sorted(augment.items()) if key not in ("copies", "version"))


def random_weights_lines(weights: dict) -> list[str]:
    """The card's warning when the backbone's weights are random (seeded), or nothing."""
    if weights["source"] != "random":
        return []
    return ["> **This model's backbone has random (seeded) weights, not ImageNet weights.** Its figures only "
            "show that the pipeline works; it is not a classifier to use.", ""]


def title_lines(card: dict, kind: str) -> list[str]:
    """MODEL_CARD.md's title of a multi-class or multi-label card (``kind`` "classes" or "labels") and the random
    weights warning."""
    names = card["class_names"]
    return [f"# Model card: {card['backbone']} + tuned head, {len(names)} {kind} ({', '.join(names)})", "",
            *random_weights_lines(card["weights"])]


def backbone_line(card: dict) -> str:
    """MODEL_CARD.md's bullet on the frozen backbone, its weights and the preprocessing inside the model."""
    weights = card["weights"]
    return (f"- Backbone: {card['backbone']} (frozen), weights {weights['source']} (SHA-256 `{weights['sha256'][:16]}`), "
            f"input {card['image_size']}×{card['image_size']} RGB; decoding, resizing and preprocessing are inside the "
            "model (`model.keras`, and `model.export/` taking encoded JPEG/PNG bytes).")


def render_model_card(card: dict) -> str:
    """MODEL_CARD.md from a sealed ``model.json`` (see ``export.model_card``)."""
    if card.get("task") == "multiclass":
        from featcache.multiclass_card import render_multiclass_card

        return render_multiclass_card(card)
    if card.get("task") == "multilabel":
        from featcache.multilabel_card import render_multilabel_card

        return render_multilabel_card(card)
    names, data = card["class_names"], card.get("training_data") or {}
    positive, weights = card["positive_class"], card["weights"]
    lines = [f"# Model card: {card['backbone']} + tuned head, {' vs '.join(names)}", "", *random_weights_lines(weights)]
    lines += [
        "## Intended use", "",
        f"Research and teaching: a transfer-learning baseline that labels a frontal chest X-ray image "
        f"{' or '.join(names)} and gives the probability of {positive}. **Not a medical device**; not for diagnosis, "
        "triage or any decision about a patient. Its threshold was chosen on a validation split and should be "
        "chosen again for any other population.", "",
        "## Model", "",
        backbone_line(card),
        f"- Head: trial {card['head']['trial_number']} of study `{card['head']['study_name']}`, parameters "
        f"`{card['head']['params']}`.",
        f"- Decision threshold {card['threshold']:.4f} ({card['threshold_method']}): {positive} when "
        f"P({positive}) ≥ threshold.", "",
        "## Training data", "",
    ]
    if data:
        lines += training_data_lines(card, lambda split: [data["images"][split][n] for n in names],
                                     f" Validation holds whole patients ({data.get('split_method', 'n/a')}), so no "
                                     "patient is in both train and validation.")
    else:
        lines += ["Not recorded (an export of an older featcache).", ""]
    lines += _metric_lines(card) + _limitation_lines(card) + _reproduce_lines(card)
    return "\n".join(lines)


def training_data_lines(card: dict, cells, note: str = "", heading: str = "") -> list[str]:
    """MODEL_CARD.md's training data: where it came from (``heading`` after it), a row per split of ``cells(split)``
    (a cell per class or label) and its patients, and the augmented copies (``note`` after them)."""
    names, data = card["class_names"], card["training_data"]
    rows = [[split, *cells(split), data["patients"][split]] for split in ("train", "val", "test")]
    return [f"From `{data.get('data_dir', 'n/a')}`; cache fingerprint `{card['cache_fingerprint'][:12]}`.{heading}", "",
            *markdown_table(["split", *names, "patients"], rows, "l" + "r" * (len(names) + 1)), "",
            f"Training images were also seen as {data.get('augmented_copies')} augmented copies "
            f"({_augment_text(data.get('augment'))}).{note}", ""]


def macro_metric_lines(card: dict, over: str) -> list[str]:
    """MODEL_CARD.md's test macro metrics of a multi-class or multi-label head (``over`` "classes" or "labels")."""
    ci = card["test_metrics_ci"]["at_threshold"]
    return [f"## Test metrics ({card['test_images']} test images; 95 % bootstrap intervals)", "",
            *markdown_table([f"metric (macro over {over})", "test"], [[name, _ci(ci.get(name))] for name in MACRO])]


def _metric_lines(card: dict) -> list[str]:
    ci = card["test_metrics_ci"]
    floors = card.get("floors") or {}
    probe = floors.get("linear_probe")
    lines = [f"## Test metrics ({card['test_images']} test images; 95 % bootstrap intervals)", "",
             f"| metric | at threshold {card['threshold']:.3f} | at 0.5 |", "| --- | --- | --- |"]
    for name in ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "pr_auc"):
        lines.append(f"| {name} | {_ci(ci['at_threshold'].get(name))} | {_ci(ci['at_0.5'].get(name))} |")
    lines += ["", f"Validation ROC-AUC {_num(card['validation_metrics'].get('roc_auc'))} (the split the head and "
              "threshold were chosen on)."]
    if floors:
        base = floors.get("majority_baseline") or {}
        lines.append(f"Floors: always answering the training majority scores accuracy {_num(base.get('accuracy'))}"
                     + (f"; a linear probe on the same features scores test ROC-AUC {_ci(probe['test_roc_auc'])}"
                        if probe else "") + ".")
    calibration = card.get("calibration")
    if calibration:
        lines.append(f"Calibration on test: Brier score {_ci(calibration['brier'])}, expected calibration error "
                     f"{_ci(calibration['ece'])} (10 equal-width bins).")
    lines += _posthoc_card_lines(card.get("post_hoc_calibration"))
    parity = card.get("parity") or {}
    if parity:
        lines.append(f"Parity: the end-to-end model and the head on cached maps differ by at most "
                     f"{parity.get('max_abs_diff', float('nan')):.1e} over {parity.get('images')} test images.")
    return lines + [""]


def _posthoc_card_lines(record: dict | None) -> list[str]:
    """The post-hoc calibration fitted on validation; the isotonic table itself, since the model does not apply it."""
    from featcache.posthoc import describe_calibration

    if not record:
        return []
    lines = [f"Post-hoc calibration: {describe_calibration(record)}."]
    if record.get("method") == "temperature":
        lines.append("The exported model outputs the temperature-scaled probability (T folded into its last layer).")
    if record.get("method") == "isotonic":
        table = record["table"]
        lines += ["", "**The exported model.keras and SavedModel output the uncalibrated score.** The calibrated "
                  "probability is this lookup of the score (linear between points, clipped outside; also "
                  "`post_hoc_calibration.table` in model.json):", "", "| score | calibrated probability |",
                  "| ---: | ---: |", *(f"| {x:.6g} | {y:.6g} |" for x, y in zip(table["x"], table["y"])), ""]
        if record.get("test"):
            lines.append(f"Calibrated probabilities on test: Brier score {_ci(record['test']['brier'])}, expected "
                         f"calibration error {_ci(record['test']['ece'])}.")
    return lines


def _limitation_lines(card: dict) -> list[str]:
    lines = ["## Known limitations", ""]
    if card["weights"]["source"] == "random":
        lines.append("- Random backbone weights: the features carry no ImageNet knowledge; re-extract with "
                     "`--weights imagenet` (or a local weights file) for a usable model.")
    lines += [f"- {DATASET_NOTE}",
              "- Trained on one image per study with image-level labels; it has not seen lateral views, other "
              "modalities, or images with devices and text burnt in beyond what the training set holds (models of "
              "this kind are known to learn such shortcuts: look at where it looks before trusting it).",
              "- Probabilities are calibrated only as far as the calibration figures above say, on this test set.", ""]
    return lines


def _reproduce_lines(card: dict) -> list[str]:
    data, head, search = card.get("training_data") or {}, card["head"], card.get("search") or {}
    extract = data.get("command") or f"featcache extract --backbone {card['backbone']} ..."
    return ["## Reproduce", "", "```bash", extract,
            f"featcache train-head --backbone {card['backbone']} --trials {search.get('trials', 'N')} "
            f"--seed {search.get('seed', 0)}" + _calibrate_flag(card),
            f"featcache evaluate --backbone {card['backbone']}", f"featcache export --backbone {card['backbone']}",
            "```", "",
            f"Cache fingerprint `{card['cache_fingerprint']}`; head SHA-256 `{head['head_sha256']}`; backbone weights "
            f"SHA-256 `{card['weights']['sha256']}`; featcache {card['versions']['featcache']}, TensorFlow "
            f"{card['versions']['tensorflow']}, Keras {card['versions']['keras']}.", ""]


def _calibrate_flag(card: dict) -> str:
    method = (card.get("post_hoc_calibration") or {}).get("method", "none")
    return f" --calibrate {method}" if method != "none" else ""
