"""``featcache export``: the evaluated end-to-end model of one backbone as model.keras (plain Keras, safe
mode, no custom objects), a TensorFlow SavedModel whose serving signature takes encoded image bytes,
and model.json, the model card. Everything is written to a temporary folder, checked, then renamed.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache import __version__
from featcache.assemble import EndToEnd, assemble_model, predict_images
from featcache.cache import find_cache
from featcache.cardtext import data_summary, extract_command, render_model_card
from featcache.data import hash_file
from featcache.decode import MAX_PIXELS, decode_and_resize, decode_bytes, scaled_decode
from featcache.errors import CacheMismatchError, FeatcacheError
from featcache.evaluate import REPORT_FILE, read_report, read_selection
from featcache.config import ExportConfig
from featcache.modelcard import (
    MODEL_CARD_FILE,
    CARD_FILE,
    KERAS_FILE,
    SAVED_MODEL_DIR,
    SIGNATURE,
    THRESHOLD_SIGNATURE,
    check_export_folder,
    seal_card,
)
from featcache.runs import check_head_matches_cache, load_head_record

log = logging.getLogger(__name__)

VERIFY_IMAGES = 8
FORCE_FIX = "--force replaces only an earlier featcache export, so nothing was deleted; choose another --out."
VERIFY_TOLERANCE = 1e-5  # reloaded artifacts vs the in-memory model: the same graph, last-bit noise only


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    card: dict


def export_model(config: ExportConfig) -> ExportSummary:
    """Write the export folder of the selected (or named) backbone.

    Raises:
        FeatcacheError: ``out`` exists without ``force``; no evaluation of this head yet.
        CacheMismatchError: the head, the cache or the report do not belong together.
        WeightsError: the backbone weights changed since extraction.
    """
    out = _resolve_out(Path(config.out))
    _check_out(out, config.force)
    cache_path = _resolve_cache(config)
    record = load_head_record(cache_path)
    manifest = check_head_matches_cache(record, cache_path)
    report = _read_report(Path(record["run_dir"]), record)
    assembled = assemble_model(cache_path, record, manifest)
    _remove_stale(out)
    tmp = out.with_name(f".{out.name}.incomplete-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        assembled.model.save(tmp / KERAS_FILE)
        write_saved_model(assembled.model, tmp / SAVED_MODEL_DIR, manifest["image_size"], float(record["threshold"]),
                          manifest["class_names"], scaled=scaled_decode(manifest.get("resize")),
                          thresholds=record.get("thresholds") if record.get("task") == "multilabel" else None)
        verification = verify_export(tmp, assembled, _verification_images(report, manifest["image_size"]))
        card = model_card(assembled, cache_path, report, verification, hash_file(tmp / KERAS_FILE))
        if report.get("task") == "multiclass":  # every class, argmax decision, per-class metrics
            from featcache.multiclass_card import multiclass_card

            card = multiclass_card(card, report)
        if report.get("task") == "multilabel":  # every label with its threshold and per-label metrics
            from featcache.multilabel_card import multilabel_card

            card = multilabel_card(card, report, cache_path)
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=1, sort_keys=True) + "\n")
        (tmp / MODEL_CARD_FILE).write_text(render_model_card(card))
        _check_out(out, config.force)  # again: the folder may have changed during the minutes of this export
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s", manifest["backbone"], out)
    return ExportSummary(out, card)


def _resolve_out(out: Path) -> Path:
    """``--out`` itself, or the folder a symbolic link ``--out`` points to: that folder is replaced and the
    link keeps pointing to it (no link is renamed or left behind). A dangling or looping link is refused."""
    if not out.is_symlink():
        return out
    try:
        return out.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise FeatcacheError(f"--out {out} is a symbolic link that leads nowhere ({type(exc).__name__}); point it "
                             f"to a folder or choose another --out. Received: out={str(out)!r}") from None


def _check_out(out: Path, force: bool) -> None:
    """Refuse an existing ``out`` unless ``force``; even then, replace only an empty folder or a folder that is
    provably an earlier export (``modelcard.check_export_folder``)."""
    if not os.path.lexists(out):
        return
    if not force:
        raise FeatcacheError(f"{out} exists; pass --force to replace it or choose another --out. Received: out={str(out)!r}")
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    check_export_folder(out, FORCE_FIX)


def _resolve_cache(config: ExportConfig) -> Path:
    if config.backbone != "best":
        return find_cache(config.cache_dir, config.backbone)
    selection = read_selection(config.cache_dir)
    path = Path(config.cache_dir) / selection["cache_file"]
    if not path.is_file():
        raise FeatcacheError(f"The selected cache {path} is gone; re-run 'featcache evaluate'. "
                             f"Received: cache_dir={str(config.cache_dir)!r}")
    return path


def _read_report(run_dir: Path, record: dict) -> dict:
    """The evaluation of exactly this head (the model card carries its test metrics)."""
    path = run_dir / REPORT_FILE
    if not path.is_file():
        raise FeatcacheError(f"The head in {run_dir} has not been evaluated; run 'featcache evaluate --backbone "
                             f"{record['backbone']}' first. Received: run_dir={str(run_dir)!r}")
    report = read_report(run_dir)
    if report["head"]["head_sha256"] != record["head_sha256"] or report["cache_fingerprint"] != record["cache_fingerprint"]:
        raise CacheMismatchError(f"{path} evaluated another head than {run_dir}/head.keras (trained again since?); "
                                 f"re-run 'featcache evaluate'. Received: run_dir={str(run_dir)!r}")
    return report


def write_saved_model(model, path: Path, image_size: int, threshold: float, class_names: list[str],
                      scaled: bool = False, thresholds: list[float] | None = None) -> None:
    """A SavedModel whose ``serving_default`` takes a batch of encoded JPEG/PNG bytes (any size, gray or
    colour) as ``image_bytes`` (shape (None,), tf.string) and returns ``probability`` (None,) float32 of
    ``class_names[1]`` and ``label`` (None,) tf.string at ``threshold``.

    Decoding and resizing are ``decode.decode_and_resize``, the very function extraction used (``scaled``: the
    cache was extracted with ``--decode fast``).

    A multi-class model (three or more ``class_names``) returns (None, k) probabilities and the argmax class; a
    multi-label one (``thresholds``, one per label) returns (None, k) probabilities and, per image, the labels at
    or above their thresholds joined by commas ('' when none), and its threshold endpoint also gives ``thresholds``.
    """
    import keras
    import tensorflow as tf

    names = tf.constant(list(class_names))
    image_spec = tf.TensorSpec((image_size, image_size, 3), tf.uint8)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve(image_bytes):
        images = tf.map_fn(lambda encoded: decode_and_resize(encoded, image_size, MAX_PIXELS, scaled), image_bytes,
                           fn_output_signature=image_spec)
        output = model(images, training=False)
        if thresholds is not None:  # multi-label: every label at its own threshold
            called = output >= tf.constant(thresholds, output.dtype)
            chosen = tf.ragged.boolean_mask(tf.broadcast_to(names, tf.shape(called)), called)
            return {"probability": output, "label": tf.strings.reduce_join(chosen, axis=1, separator=",")}
        if len(class_names) > 2:  # multi-class: (None, k) probabilities and the class of the largest (argmax)
            return {"probability": output, "label": tf.gather(names, tf.argmax(output, axis=1, output_type=tf.int32))}
        probability = output[:, 0]
        return {"probability": probability, "label": tf.gather(names, tf.cast(probability >= threshold, tf.int32))}

    @tf.function(input_signature=[])
    def saved_threshold():  # lets 'featcache verify' compare the SavedModel's threshold with model.json's
        extra = {} if thresholds is None else {"thresholds": tf.constant(thresholds, tf.float64)}
        return {"threshold": tf.constant(threshold, tf.float64), **extra}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE, serve)
    archive.add_endpoint(THRESHOLD_SIGNATURE, saved_threshold)
    tf_log = logging.getLogger("tensorflow")
    level = tf_log.level
    tf_log.setLevel(logging.WARNING)  # "Assets written to <temporary folder>" would only confuse
    try:
        archive.write_out(str(path), verbose=False)
    finally:
        tf_log.setLevel(level)


def _verification_images(report: dict, image_size: int) -> list[tuple[str, bytes]]:
    """Encoded images to check the artifacts on: the first evaluated test files if still there, else
    ``synthetic_images``, so export works without the data folder."""
    found = []
    for path in report["predictions"]["path"][:VERIFY_IMAGES]:
        file = Path(report["data_dir"]) / path
        if file.is_file():
            found.append((path, file.read_bytes()))
    return found or synthetic_images(image_size)


def synthetic_images(image_size: int) -> list[tuple[str, bytes]]:
    """Two seeded encoded images, a gray PNG and a colour JPEG, neither square nor of ``image_size``."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (image_size + 7, image_size * 2, 1), dtype=np.uint8)
    colour = rng.integers(0, 256, (image_size * 2, image_size + 3, 3), dtype=np.uint8)
    return [("synthetic-gray.png", tf.io.encode_png(gray).numpy()),
            ("synthetic-colour.jpeg", tf.io.encode_jpeg(colour).numpy())]


def verify_export(folder: Path, assembled: EndToEnd, encoded: list[tuple[str, bytes]]) -> dict:
    """Reload model.keras (safe mode) and the SavedModel; both must reproduce the in-memory model.

    Raises:
        FeatcacheError: a reloaded artifact disagrees by more than ``VERIFY_TOLERANCE``.
    """
    import keras
    import tensorflow as tf

    size = assembled.manifest["image_size"]
    scaled = scaled_decode(assembled.manifest.get("resize"))
    images = np.stack([decode_bytes(data, size, name=name, scaled=scaled) for name, data in encoded])
    expected = predict_images(assembled.model, images)
    reloaded = predict_images(keras.saving.load_model(folder / KERAS_FILE, safe_mode=True), images)
    serving = tf.saved_model.load(str(folder / SAVED_MODEL_DIR)).signatures[SIGNATURE]
    served = serving(image_bytes=tf.constant([data for _, data in encoded]))["probability"].numpy()
    result = {"images": [name for name, _ in encoded], "tolerance": VERIFY_TOLERANCE,
              "max_abs_diff_model_keras": float(np.max(np.abs(reloaded - expected))),
              "max_abs_diff_saved_model": float(np.max(np.abs(served - expected)))}
    for key in ("max_abs_diff_model_keras", "max_abs_diff_saved_model"):
        if result[key] > VERIFY_TOLERANCE:
            raise FeatcacheError(f"The exported {key[13:]} does not reproduce the evaluated model ({result[key]:.3g} > "
                                 f"{VERIFY_TOLERANCE:g}); nothing was written. Received: {key}={result[key]:.3g}")
    return result


def model_card(assembled: EndToEnd, cache_path: Path, report: dict, verification: dict, keras_sha256: str) -> dict:
    """model.json: what the model is, what it was built from, how it scored; sealed with its own SHA-256."""
    import keras
    import tensorflow as tf

    manifest, record = assembled.manifest, assembled.record
    return seal_card({
        "backbone": manifest["backbone"],
        **({"feature_layer": manifest["feature_layer"]} if manifest.get("feature_layer") else {}),
        "weights": {"source": manifest["weights"]["source"], "sha256": assembled.weights_sha256},
        "cache_file": Path(cache_path).name,
        "cache_fingerprint": manifest["fingerprint"],
        "image_size": manifest["image_size"],
        "preprocessing": {"decode_and_resize": manifest.get("resize"), "max_pixels": MAX_PIXELS,
                          "backbone": manifest.get("preprocessing")},
        "class_names": manifest["class_names"],
        "positive_class": manifest["class_names"][1],
        "threshold": float(record["threshold"]),
        "threshold_method": record["threshold_method"],
        "head": {"params": record["params"], "trial_number": record["trial_number"],
                 "study_name": record.get("study_name"), "head_sha256": record["head_sha256"]},
        "validation_metrics": record["val_metrics"],
        "test_metrics": {key: {name: m["value"] for name, m in report[key]["metrics"].items()}
                         for key in ("at_threshold", "at_0.5")},
        "test_metrics_ci": {key: report[key]["metrics"] for key in ("at_threshold", "at_0.5")},
        "test_images": report["test"]["images"],
        "floors": {"majority_baseline": report["baseline"]["metrics"],
                   "linear_probe": None if not report.get("probe") else {
                       "c": report["probe"]["c"], "val_roc_auc": report["probe"]["validation"]["roc_auc"],
                       "test_roc_auc": report["probe"]["test"]["metrics"]["roc_auc"]}},
        "calibration": (report.get("calibration") or {}).get("metrics"),
        "post_hoc_calibration": {**(record.get("calibration") or {"method": "none"}),
                                 **({"test": report["calibrated"]["metrics"]} if report.get("calibrated") else {})},
        "training_data": {**data_summary(cache_path), "data_dir": manifest["data_dir"],
                          "command": extract_command(manifest), "augment": manifest["augment"],
                          "split_method": manifest["split"]["method"]},
        "search": _search(record),
        "parity": report["parity"],
        "verification": verification,
        "files": {"keras": KERAS_FILE, "keras_sha256": keras_sha256, "saved_model": SAVED_MODEL_DIR,
                  "signature": SIGNATURE, "inputs": {"image_bytes": "(None,) tf.string, encoded JPEG or PNG"},
                  "outputs": {"probability": _probability_text(record, manifest["class_names"][1]),
                              "label": "(None,) tf.string, class name at the threshold"},
                  "keras_input": f"(None, {manifest['image_size']}, {manifest['image_size']}, 3) uint8 RGB"},
        "versions": {"featcache": __version__, "tensorflow": tf.__version__, "keras": keras.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })


def _probability_text(record: dict, positive: str) -> str:
    """What the exported probability is: after an isotonic calibration, the score the lookup must be applied to."""
    if (record.get("calibration") or {}).get("method") == "isotonic":
        return (f"(None,) float32, the UNCALIBRATED score of {positive}; the calibrated P({positive}) is "
                "post_hoc_calibration.table applied to it (linear between points, clipped outside)")
    return f"(None,) float32, P({positive})"


def _search(record: dict) -> dict:
    """How many trials the head's study held and its base seed (trial n is seeded with seed + n)."""
    trials = Path(record["run_dir"]) / "trials.jsonl"
    count = sum(1 for line in trials.read_text().splitlines() if line.strip()) if trials.is_file() else None
    return {"trials": count, "seed": int(record["seed"]) - int(record["trial_number"])}


def _remove_stale(out: Path) -> None:
    """Remove temporary folders of earlier exports to ``out`` whose process is gone (killed mid-export)."""
    for folder in out.parent.glob(f".{out.name}.incomplete-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (``--force``) is moved aside first, then removed."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
