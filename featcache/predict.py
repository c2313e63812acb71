"""``featcache predict``: a label and probability per image from an exported model folder, at the
threshold saved in its model card (checked against the card's own SHA-256). Only regular files up to a
size limit are read; everything else is reported and skipped."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from featcache.assemble import predict_padded
from featcache.config import check_max_pixels
from featcache.data import IMAGE_EXTENSIONS
from featcache.decode import MAX_PIXELS, decode_bytes, scaled_decode
from featcache.errors import DataError
from featcache.integrity import load_keras_checked
from featcache.modelcard import CARD_FILE, KERAS_FILE, read_card
from featcache.posthoc import calibrated_probability

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictResult:
    """``predictions``: {"path", "label", "probability"[, "calibrated_probability" (isotonic)]} per image read;
    ``skipped``: {"path", "error"}."""

    predictions: list[dict]
    skipped: list[dict]
    card: dict


MAX_FILE_MB = 64  # default of --max-file-mb: larger inputs are skipped unread
FIX = "re-run 'featcache export' or pass --model DIR."


def find_inputs(inputs: list[Path]) -> tuple[list[Path], list[dict]]:
    """Candidate files: each path given (DICOM recognised by its preamble too), and the JPEG/PNG/.dcm names
    under each folder (sorted; links to folders are not followed); paths that do not exist are reported as
    skipped. Nothing is opened here."""
    files, skipped = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                            and not p.name.startswith(".") and not p.is_dir())
        elif os.path.lexists(item):
            files.append(item)
        else:
            skipped.append({"path": str(item), "error": "does not exist"})
    return files, skipped


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; anything else is refused before it is opened
    (a FIFO would block, /dev/zero never ends), and re-checked on the open descriptor.

    Raises:
        DataError: not a regular file, a dangling link or a link loop, too large, or unreadable.
    """
    try:
        info = os.stat(path)  # follows links; a loop raises ELOOP, a dangling link ENOENT
    except OSError as exc:
        raise DataError(f"cannot read: {_stat_reason(path, exc)}") from None
    _check_regular(info, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        _check_regular(os.fstat(fd), max_bytes)  # the path may have been swapped since the stat
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DataError(f"larger than {max_bytes / 2**20:g} MiB (--max-file-mb)")
    return data


def _check_regular(info: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
                stat.S_IFSOCK: "a socket"}.get(stat.S_IFMT(info.st_mode), "not a regular file")
        raise DataError(f"{kind}, not a regular file; not read")
    if info.st_size > max_bytes:
        raise DataError(f"{info.st_size / 2**20:.1f} MiB, larger than {max_bytes / 2**20:g} MiB (--max-file-mb); not read")


def _stat_reason(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "a symbolic link loop"
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return "a dangling symbolic link"
    return exc.strerror or type(exc).__name__


def predict_files(inputs: list[Path], model_dir: str | Path, batch_size: int = 32,
                  max_pixels: int = MAX_PIXELS, max_file_mb: float = MAX_FILE_MB, progress: bool = False) -> PredictResult:
    """Predict every image of ``inputs`` (files or folders) with the export in ``model_dir``; images of
    more than ``max_pixels`` pixels (by their header) are skipped without being decoded.

    Only regular files of at most ``max_file_mb`` MiB are read; FIFOs, devices, link loops, dangling links and
    larger files are skipped. Files are read, decoded and scored ``batch_size`` at a time, so memory holds one
    batch of images whatever the number of inputs; ``progress`` shows a tqdm bar over the files.

    Raises:
        FeatcacheError: ``model_dir`` is not an export.
        DamagedFileError, CacheMismatchError: model.json was edited (its own SHA-256, e.g. the threshold), or
            model.keras is not the file model.json records, or safe mode refuses it.
        DataError: no image could be read (nothing to predict).
    """
    check_max_pixels(max_pixels)
    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1. Received: batch_size={batch_size}")
    model_dir = Path(model_dir)
    card = read_card(model_dir, FIX)
    model = load_keras_checked(model_dir / KERAS_FILE, card["files"]["keras_sha256"], model_dir / CARD_FILE, FIX)
    files, skipped = find_inputs(inputs)
    threshold, names = float(card["threshold"]), card["class_names"]
    width = max(1, min(batch_size, len(files)))  # one input shape for every batch: one trace
    predictions: list[dict] = []
    with tqdm(total=len(files), unit="img", desc="predict", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(files), width):
            kept, images = _read_batch(files[start:start + width], card["image_size"], max_pixels, max_file_mb, skipped,
                                       scaled_decode(card["preprocessing"].get("decode_and_resize")))
            if images:
                for file, prob in zip(kept, predict_padded(model, np.stack(images), width)):
                    predictions.append(_multilabel_prediction(file, prob, names, card["thresholds"])
                                       if card.get("task") == "multilabel" else _prediction(file, prob, names, threshold))
            bar.update(len(files[start:start + width]))
    calibrated = calibrated_probability(card.get("post_hoc_calibration"), [p["probability"] for p in predictions])
    if calibrated is not None:  # isotonic: a lookup the model does not apply; the label stays on the model's score
        for prediction, value in zip(predictions, calibrated):
            prediction["calibrated_probability"] = float(value)
    for item in skipped:
        log.debug("skipped %s: %s", item["path"], item["error"])
    if not predictions:
        first = f" (e.g. {skipped[0]['path']}: {skipped[0]['error']})" if skipped else ""
        raise DataError(f"No readable image among the inputs{first}; expected JPEG, PNG or DICOM files or folders of "
                        f"them. Received: inputs={[str(i) for i in inputs][:3]}")
    return PredictResult(predictions, skipped, card)


def _prediction(file: Path, prob: np.ndarray, names: list[str], threshold: float) -> dict:
    """``{"path", "label", "probability"}``: at the card's threshold for a binary model (P(class 1)); for a
    multi-class one (a probability per class) the argmax class, its probability and ``probabilities``
    {class: P}."""
    if np.ndim(prob) == 0:
        return {"path": str(file), "label": names[int(prob >= threshold)], "probability": float(prob)}
    best = int(np.argmax(prob))
    return {"path": str(file), "label": names[best], "probability": float(prob[best]),
            "probabilities": {name: float(p) for name, p in zip(names, prob)}}


def _multilabel_prediction(file: Path, prob: np.ndarray, names: list[str], thresholds: list[float]) -> dict:
    """``{"path", "label", "probability", "probabilities", "positive_labels"}`` of a multi-label model: each label
    called at its own threshold; ``label`` the called labels joined by commas ('' when none, as the SavedModel
    says), ``probability`` the largest of the k."""
    positive = [name for name, p, t in zip(names, prob, thresholds) if p >= t]
    return {"path": str(file), "label": ",".join(positive), "probability": float(np.max(prob)),
            "probabilities": {name: float(p) for name, p in zip(names, prob)}, "positive_labels": positive}


def _read_batch(files: list[Path], size: int, max_pixels: int, max_file_mb: float,
                skipped: list[dict], scaled: bool = False) -> tuple[list[Path], list[np.ndarray]]:
    """Read and decode these files; (files decoded, their (s, s, 3) images); the others go to ``skipped``."""
    kept, images = [], []
    for file in files:
        try:
            images.append(decode_bytes(read_regular_file(file, int(max_file_mb * 2**20)), size, name=str(file),
                                       max_pixels=max_pixels, scaled=scaled))
            kept.append(file)
        except DataError as exc:
            skipped.append({"path": str(file), "error": str(exc)})
    return kept, images


def format_predictions(result: PredictResult, as_json: bool = False) -> str:
    """One line per image (``label  probability  path``), or one JSON document."""
    if as_json:
        card = result.card
        return json.dumps({"backbone": card["backbone"], "threshold": card["threshold"],
                           **({"thresholds": card["thresholds"]} if card.get("task") == "multilabel" else {}),
                           "positive_class": card["positive_class"], "predictions": result.predictions,
                           "skipped": result.skipped}, indent=1)
    if result.card.get("task") == "multilabel":  # every label's probability, then the labels called
        return "\n".join("  ".join(f"{n} {q:.4f}" for n, q in p["probabilities"].items())
                         + f"  [{p['label'] or 'none'}]  {p['path']}" for p in result.predictions)
    width = max(len(name) for name in result.card["class_names"])
    return "\n".join(f"{p['label']:<{width}}  {p['probability']:.4f}  " + (
        f"calibrated {p['calibrated_probability']:.4f}  " if "calibrated_probability" in p else "") + p["path"]
        for p in result.predictions)
