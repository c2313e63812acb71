"""``featcache predict``: a label and probability per image from an exported model folder, at the
threshold saved in its model card. Unreadable files are reported and skipped."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.assemble import predict_images
from featcache.config import check_max_pixels
from featcache.data import IMAGE_EXTENSIONS, MAX_PIXELS, load_image
from featcache.errors import DataError, FeatcacheError
from featcache.export import CARD_FILE, KERAS_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictResult:
    """``predictions``: {"path", "label", "probability"} per image read; ``skipped``: {"path", "error"}."""

    predictions: list[dict]
    skipped: list[dict]
    card: dict


def read_card(model_dir: str | Path) -> dict:
    """The model card of an export folder.

    Raises:
        FeatcacheError: the folder is not a complete featcache export.
    """
    model_dir = Path(model_dir)
    if not (model_dir / CARD_FILE).is_file() or not (model_dir / KERAS_FILE).is_file():
        raise FeatcacheError(f"{model_dir} is not a featcache export (expected {CARD_FILE} and {KERAS_FILE}); run "
                             f"'featcache export' or pass --model DIR. Received: model={str(model_dir)!r}")
    return json.loads((model_dir / CARD_FILE).read_text())


def find_inputs(inputs: list[Path]) -> tuple[list[Path], list[dict]]:
    """Files to predict: each file given, and the JPEG/PNG images under each folder (sorted); paths
    that do not exist are reported as skipped."""
    files, skipped = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                            and not p.name.startswith("."))
        elif item.exists():
            files.append(item)
        else:
            skipped.append({"path": str(item), "error": "does not exist"})
    return files, skipped


def predict_files(inputs: list[Path], model_dir: str | Path, batch_size: int = 32,
                  max_pixels: int = MAX_PIXELS) -> PredictResult:
    """Predict every image of ``inputs`` (files or folders) with the export in ``model_dir``; images of
    more than ``max_pixels`` pixels (by their header) are skipped without being decoded.

    Raises:
        FeatcacheError: ``model_dir`` is not an export.
        DataError: no image could be read (nothing to predict).
    """
    import keras

    check_max_pixels(max_pixels)
    card = read_card(model_dir)
    model = keras.saving.load_model(Path(model_dir) / KERAS_FILE, safe_mode=True, compile=False)
    files, skipped = find_inputs(inputs)
    size, threshold, names = card["image_size"], float(card["threshold"]), card["class_names"]
    predictions: list[dict] = []
    for start in range(0, len(files), batch_size):
        images, kept = [], []
        for file in files[start:start + batch_size]:
            try:
                images.append(load_image(file, size, max_pixels))
                kept.append(file)
            except DataError as exc:
                skipped.append({"path": str(file), "error": str(exc)})
        if not images:
            continue
        for file, prob in zip(kept, predict_images(model, np.stack(images), batch_size)):
            predictions.append({"path": str(file), "label": names[int(prob >= threshold)],
                                "probability": float(prob)})
    for item in skipped:
        log.debug("skipped %s: %s", item["path"], item["error"])
    if not predictions:
        first = f" (e.g. {skipped[0]['path']}: {skipped[0]['error']})" if skipped else ""
        raise DataError(f"No readable image among the inputs{first}; expected JPEG or PNG files or folders of "
                        f"them. Received: inputs={[str(i) for i in inputs][:3]}")
    return PredictResult(predictions, skipped, card)


def format_predictions(result: PredictResult, as_json: bool = False) -> str:
    """One line per image (``label  probability  path``), or one JSON document."""
    if as_json:
        card = result.card
        return json.dumps({"backbone": card["backbone"], "threshold": card["threshold"],
                           "positive_class": card["positive_class"], "predictions": result.predictions,
                           "skipped": result.skipped}, indent=1)
    width = max(len(name) for name in result.card["class_names"])
    return "\n".join(f"{p['label']:<{width}}  {p['probability']:.4f}  {p['path']}" for p in result.predictions)
