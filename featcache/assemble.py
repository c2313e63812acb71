"""The end-to-end model: raw uint8 RGB image -> the backbone's preprocessing layers -> the frozen backbone
with the cache's weights -> the trained head; and the parity check that it computes, image for image,
what the head computes on the cached features.

Every piece is a definition extraction already uses (``decode.decode_and_resize``,
``backbones.build_extractor``, ``backbones.load_cached_backbone``), so parity holds by construction and
the check guards it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.backbones import build_extractor, get_backbone_spec, hash_weights, load_cached_backbone
from featcache.decode import RESIZE, resize_settings
from featcache.errors import CacheMismatchError, FeatcacheError
from featcache.integrity import load_keras_checked

log = logging.getLogger(__name__)

# Largest |end-to-end prob - head(cached maps) prob| allowed, by cache dtype: float16 maps carry a
# relative rounding of 2**-11, float32 maps only the last-bit noise of other batch compositions.
PARITY_TOLERANCE = {"float16": 1e-3, "float32": 1e-5}


@dataclass
class EndToEnd:
    """The reassembled model and what it was built from.

    Attributes:
        model: (n, s, s, 3) uint8 RGB -> (n, 1) probability of ``class_names[1]``.
        head: (n, h, w, c) maps -> (n, 1), the very head inside ``model``.
        weights_sha256: hash of the backbone weights in ``model`` (equal to the manifest's).
        manifest: the cache's manifest.
        record: the head's record (``runs.load_head_record``).
    """

    model: keras.Model  # noqa: F821
    head: keras.Model  # noqa: F821
    weights_sha256: str
    manifest: dict
    record: dict


def load_head(record: dict, manifest: dict):
    """The trained head of ``record``, loaded in safe mode, checked against the cache's feature shape.

    Raises:
        CacheMismatchError: head.keras is not the file head.json records (checked again right before loading),
            or the head takes maps of another shape than the cache holds.
        DamagedFileError: Keras cannot load it in safe mode.
    """
    record_path = Path(record["run_dir"]) / "head.json"
    head = load_keras_checked(Path(record["head_path"]), record["head_sha256"], record_path,
                              "Re-run 'featcache train-head'.")
    expected = tuple(manifest["feature_shape"])
    found = tuple(head.input_shape[1:])
    if found != expected:
        raise CacheMismatchError(
            f"The head {record['head_path']} takes maps of shape {found}, but the cache holds {expected}; re-run "
            f"'featcache train-head'. Received: feature_shape={list(found)}"
        )
    return head


def assemble_model(cache_path: str | Path, record: dict, manifest: dict) -> EndToEnd:
    """Reassemble preprocessing + the cache's frozen backbone + the trained head into one Keras model.

    Args:
        cache_path: the cache file the head was trained on.
        record: from ``runs.load_head_record``, already checked against the cache
            (``runs.check_head_matches_cache``).
        manifest: the cache's manifest.

    Returns:
        EndToEnd with the model, named ``featcache_<backbone>``.

    Raises:
        WeightsError: the backbone weights are gone or no longer hash to the manifest's.
        CacheMismatchError: the head does not fit the cache's feature shape, or the cache was decoded
            another way than ``decode.decode_and_resize`` decodes now.
    """
    import keras

    check_decoding(cache_path, manifest)
    spec = get_backbone_spec(manifest["backbone"])
    backbone = load_cached_backbone(cache_path, manifest)  # refuses weights of another hash
    head = load_head(record, manifest)
    extractor = build_extractor(spec, backbone, manifest["image_size"], manifest.get("feature_layer"))
    model = keras.Model(extractor.input, head(extractor.output), name=f"featcache_{spec.name}")
    return EndToEnd(model, head, hash_weights(backbone), manifest, record)


def check_decoding(cache_path: str | Path, manifest: dict) -> None:
    """Refuse a cache whose images were decoded or resized otherwise than ``decode.resize_settings`` says now: its
    features are not what the end-to-end model computes (an older featcache decoded JPEG less accurately).

    Raises:
        CacheMismatchError: the manifest records another ``resize``.
    """
    recorded = manifest.get("resize")
    if recorded is not None and recorded not in (resize_settings("exact"), resize_settings("fast")):
        version = recorded.get("decode_version", 1)
        raise CacheMismatchError(
            f"{Path(cache_path).name} was extracted with decoding version {version}, this featcache decodes with "
            f"version {RESIZE['decode_version']} ({RESIZE['decode']}); re-run 'featcache extract' (it writes a new "
            f"cache) and 'featcache train-head'. Received: decode_version={version}"
        )


def predict_images(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """(n, s, s, 3) uint8 -> (n,) float32 probabilities. Fewer images than a batch are not padded."""
    return predict_padded(model, images, max(1, min(batch_size, len(images))))


def predict_features(head, features: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(n, h, w, c) cached maps (any float dtype, cast to float32) -> (n,) float32 probabilities."""
    return predict_padded(head, features, max(1, min(batch_size, len(features))), dtype=np.float32)


def predict_padded(model, inputs: np.ndarray, width: int, dtype=None) -> np.ndarray:
    """(n, ...) -> (n,) float32 probabilities ((n, k) of a k-output model), in batches of exactly ``width``
    rows, the last padded with zeros.

    One input shape, so Keras traces its predict step once per model (a retrace of a ResNet152 costs
    seconds, more than the padding). A caller that streams its inputs passes the same ``width`` on every
    call: on a CPU a row's probability can differ in the last float32 bit between batch shapes (the
    kernels are chosen by shape), so the streamed batches are the ones ``predict_images`` would run.
    """
    probs = []
    for start in range(0, len(inputs), width):
        chunk = inputs[start:start + width]
        chunk = chunk.astype(dtype) if dtype is not None else chunk
        n = len(chunk)
        if n < width:
            chunk = np.concatenate([chunk, np.zeros((width - n, *chunk.shape[1:]), chunk.dtype)])
        out = np.asarray(model.predict_on_batch(chunk), np.float32)[:n]
        probs.append(out[:, 0] if out.shape[1] == 1 else out)  # (n, k) with k > 1 outputs (multi-class)
    return np.concatenate(probs) if probs else np.empty((0,), np.float32)


def check_parity(end_to_end: np.ndarray, cached: np.ndarray, dtype: str, names: list[str],
                 precision: str = "float32") -> dict:
    """Compare the end-to-end probabilities with the head's on the cached maps, image by image.

    Args:
        end_to_end: (n,) probabilities of the reassembled model on the raw images.
        cached: (n,) probabilities of the head on those images' cached maps.
        dtype: storage dtype of the cache ("float16" or "float32"), which sets the tolerance.
        names: (n,) image names, to name the worst one.
        precision: the precision the cache was extracted in (manifest ``precision``); the end-to-end
            model always computes in float32, so a ``mixed`` cache also carries float16 compute error.

    Returns:
        ``{"images", "max_abs_diff", "mean_abs_diff", "tolerance", "cache_dtype", "cache_precision", "worst"}``.

    Raises:
        FeatcacheError: the largest difference exceeds the tolerance: the end-to-end model does not
            compute what the cache holds (preprocessing, resizing or weights differ).
    """
    tolerance = PARITY_TOLERANCE[dtype]
    diff = np.abs(np.asarray(end_to_end, np.float64) - np.asarray(cached, np.float64))
    diff = diff.max(axis=1) if diff.ndim == 2 else diff  # multi-class: the largest over an image's classes
    worst = int(np.argmax(diff)) if len(diff) else -1
    result = {"images": len(diff), "max_abs_diff": float(diff.max()) if len(diff) else 0.0,
              "mean_abs_diff": float(diff.mean()) if len(diff) else 0.0, "tolerance": tolerance,
              "cache_dtype": dtype, "cache_precision": precision, "worst": names[worst] if worst >= 0 else None}
    if result["max_abs_diff"] > tolerance:
        cause = ("the cache was extracted with --precision mixed (float16 arithmetic); re-extract with "
                 "--precision float32" if precision == "mixed" else
                 "the images or preprocessing changed since extraction; re-run 'featcache extract'")
        raise FeatcacheError(
            f"Parity check failed: the end-to-end probability of {result['worst']} differs from the head's on its "
            f"cached features by {result['max_abs_diff']:.3g} (tolerance {tolerance:g} for a {dtype} cache): "
            f"{cause}. Received: max_abs_diff={result['max_abs_diff']:.3g}"
        )
    log.info("parity: %d test images, max |end-to-end - cached| = %.3g (tolerance %g)",
             result["images"], result["max_abs_diff"], tolerance)
    return result
