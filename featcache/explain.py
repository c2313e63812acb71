"""``featcache explain``: Grad-CAM heatmaps of the head's decision, per image, as PNG overlays and JSON.

Two sources, one arithmetic (``gradcam.gradcam``):

- cached rows (``--cache-dir``, ``--backbone``, ``--split``): the maps come from the cache, no backbone runs;
  the raw file is read only to draw the overlay. With ``check`` (the default) the end-to-end model also
  computes each heatmap from the raw file, and the largest difference between the two (on heatmaps scaled
  to [0, 1]) must stay within ``HEATMAP_TOLERANCE`` of the cache's dtype, as the parity check does for
  probabilities.
- new files (``--model``, an export folder): the exported end-to-end model computes the maps.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.errors import DataError, FeatcacheError
from featcache.gradcam import end_to_end_maps, gradcam, normalize

log = logging.getLogger(__name__)

# Largest |cached - end-to-end| of a heatmap scaled to [0, 1], where the end-to-end maps are first rounded to the
# cache's dtype, as extraction stored them: equal but for a last-bit flip where another batch shape moved a
# float32 value across a rounding boundary (measured on the dev set: 0 with ResNet152 and the tiny backbone).
# Against unrounded float32 maps the difference is the storage precision's own effect, reported, not judged:
# Grad-CAM sums thousands of signed channel terms, and where they nearly cancel, float16 rounding of the maps
# moves a scaled heatmap by several hundredths (measured: up to 0.039, ResNet152, 1 of 6 test images).
HEATMAP_TOLERANCE = {"float16": 1e-2, "float32": 1e-3}
HEATMAPS_FILE = "heatmaps.json"


@dataclass
class Explanation:
    path: str  # relative to the data folder (cached rows) or as given (files)
    label: str | None  # the true class of a cached row; None for a new file
    probability: float  # of the positive class
    predicted: str  # the class at the head's threshold
    heatmap: np.ndarray  # (h, w) raw Grad-CAM values
    image: np.ndarray | None = field(default=None, repr=False)  # (s, s, 3) uint8, for the overlay


@dataclass
class ExplainResult:
    explanations: list[Explanation]
    skipped: list[dict]
    source: str  # "cache <file>" or "model <folder>"
    agreement: dict | None  # cached vs end-to-end heatmaps, when checked
    positive: str  # the positive class, whose probability and heatmap these are


def select_cache(cache_dir: Path, backbone: str | None) -> Path:
    """The cache to explain: ``backbone``'s, else the one ``featcache evaluate`` selected, else the only one.

    Raises:
        FeatcacheError: no cache, or several and no selection to choose among them.
    """
    from featcache.cache import find_cache, list_caches
    from featcache.evaluate import SELECTION_FILE, read_selection

    if backbone is not None:
        return find_cache(cache_dir, backbone)
    if (Path(cache_dir) / "runs" / SELECTION_FILE).is_file():
        return Path(cache_dir) / read_selection(cache_dir)["cache_file"]
    caches = list_caches(cache_dir)
    if len(caches) != 1:
        raise FeatcacheError(f"{len(caches)} caches in {cache_dir} and no evaluation selected one; pass --backbone "
                             f"NAME. Received: cache_dir={str(cache_dir)!r}")
    return caches[0]


def explain_cached(cache_path: Path, split: str = "test", limit: int | None = 32, data_dir: Path | None = None,
                   check: bool = True) -> ExplainResult:
    """Heatmaps of the first ``limit`` original images of ``split`` in a cache, from their cached maps.

    Raises:
        FeatcacheError: no trained head for the cache, an unknown split, or no image of that split.
        CacheMismatchError: the head does not belong to the cache.
        FeatcacheError: ``check`` and a heatmap differs from the end-to-end one by more than the tolerance.
    """
    from featcache.assemble import assemble_model
    from featcache.runs import check_head_matches_cache, load_head_record

    record = load_head_record(cache_path)
    manifest = check_head_matches_cache(record, cache_path)
    _check_binary(manifest["class_names"], Path(cache_path).name, manifest.get("task"))
    data_dir = Path(data_dir) if data_dir is not None else Path(manifest["data_dir"])
    paths, labels, maps = cached_rows(cache_path, split, limit=limit)
    assembled = assemble_model(cache_path, record, manifest)
    explanations, skipped = explain_maps(assembled, data_dir, paths, labels, maps)
    agreement = _check_agreement(assembled, explanations, manifest["dtype"]) if check else None
    return ExplainResult(explanations, skipped, f"cache {Path(cache_path).name}", agreement,
                         manifest["class_names"][1])


def cached_rows(cache_path: Path, split: str, limit: int | None = None,
                paths: list[str] | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Paths, labels and (float32) cached maps of the original images of ``split``: the first ``limit`` of
    them, or those of ``paths`` (in that order).

    Raises:
        FeatcacheError: an unknown split, no image of that split, or a path that is not one of its images.
    """
    from featcache.cache import open_cache, read_rows
    from featcache.checksums import read_checked
    from featcache.data import SPLIT_CODES

    if split not in SPLIT_CODES:
        raise FeatcacheError(f"--split must be one of {', '.join(SPLIT_CODES)}. Received: split={split!r}")
    with open_cache(cache_path) as handle:
        splits = read_checked(handle, "split")
        copies, labels = read_checked(handle, "copy_index", splits), read_checked(handle, "labels", splits)
        rows = np.flatnonzero((splits == SPLIT_CODES[split]) & (copies == 0))
        if not len(rows):
            raise FeatcacheError(f"{Path(cache_path).name} has no {split} images. Received: split={split!r}")
        names = read_checked(handle, "files/path")[read_rows(handle["source_index"], rows)].tolist()
        if paths is None:
            rows, names = rows[:limit], names[:limit]
        else:
            where = dict(zip(names, rows))
            missing = [p for p in paths if p not in where]
            if missing:
                raise FeatcacheError(f"{missing[0]} is not a {split} image of {Path(cache_path).name}. "
                                     f"Received: path={missing[0]!r}")
            rows, names = np.array([where[p] for p in paths], np.int64), list(paths)
        order = np.argsort(rows, kind="stable")  # h5py reads rows in increasing order
        maps = np.empty((len(rows), *handle["features"].shape[1:]), np.float32)
        if len(rows):
            maps[order] = read_rows(handle["features"], rows[order])
    return names, labels[rows], maps


def explain_maps(assembled, data_dir: Path, paths: list[str], labels: np.ndarray,
                 maps: np.ndarray) -> tuple[list[Explanation], list[dict]]:
    """Heatmaps of cached maps with the raw images (from ``data_dir``) for the overlays; an unreadable raw file
    keeps its heatmap and is listed (no overlay)."""
    from featcache.data import load_image, scaled_decode

    manifest, record = assembled.manifest, assembled.record
    heatmaps, probs = gradcam(assembled.head, maps)
    names, threshold = manifest["class_names"], float(record["threshold"])
    explanations, skipped = [], []
    for path, label, heatmap, prob in zip(paths, labels, heatmaps, probs):
        try:
            image = load_image(Path(data_dir) / path, manifest["image_size"], scaled=scaled_decode(manifest.get("resize")))
        except DataError as exc:  # the heatmap stands; only the overlay is lost
            skipped.append({"path": path, "error": f"no overlay: {exc}"})
            image = None
        explanations.append(Explanation(path, names[int(label)], float(prob), names[int(prob >= threshold)],
                                        heatmap, image))
    return explanations, skipped


def _check_agreement(assembled, explanations: list[Explanation], dtype: str) -> dict:
    """Heatmaps recomputed end to end from the decoded raw images, against the cached ones (see
    ``HEATMAP_TOLERANCE``): ``max_abs_diff`` with the end-to-end maps rounded to the cache's dtype (checked),
    ``storage_max_abs_diff`` with them in float32 (the storage precision's effect, reported)."""
    with_image = [e for e in explanations if e.image is not None]
    tolerance = HEATMAP_TOLERANCE[dtype]
    if not with_image:
        return {"images": 0, "max_abs_diff": None, "storage_max_abs_diff": None, "tolerance": tolerance}
    maps = end_to_end_maps(assembled.model, np.stack([e.image for e in with_image]))
    stored, _ = gradcam(assembled.head, maps.astype(dtype).astype(np.float32))
    full, _ = gradcam(assembled.head, maps)
    diffs = [float(np.abs(normalize(e.heatmap) - normalize(h)).max()) for e, h in zip(with_image, stored)]
    storage = [float(np.abs(normalize(e.heatmap) - normalize(h)).max()) for e, h in zip(with_image, full)]
    worst = int(np.argmax(diffs))
    result = {"images": len(diffs), "max_abs_diff": diffs[worst], "tolerance": tolerance, "worst": with_image[worst].path,
              "storage_max_abs_diff": max(storage), "storage_worst": with_image[int(np.argmax(storage))].path,
              "scale": "each heatmap divided by its maximum", "cache_dtype": dtype}
    if result["max_abs_diff"] > tolerance:
        raise FeatcacheError(f"The cached heatmap of {result['worst']} differs from the end-to-end one by "
                             f"{result['max_abs_diff']:.3g} (tolerance {tolerance:g}, maps rounded to {dtype} as "
                             f"cached): the images or weights changed since extraction; re-run 'featcache extract'. "
                             f"Received: max_abs_diff={result['max_abs_diff']:.3g}")
    return result


def _check_binary(class_names: list[str], source: str, task: str | None = None) -> None:
    if task == "multilabel":  # even with two labels: no single positive class to explain
        raise FeatcacheError(f"explain draws the heatmap of a binary head's positive class; {source} is a multi-label "
                             f"model of {len(class_names)} labels (multi-label Grad-CAM is not built). "
                             f"Received: labels={list(class_names)}")
    if len(class_names) > 2:
        raise FeatcacheError(f"explain draws the heatmap of a binary head's positive class; {source} has "
                             f"{len(class_names)} classes (multi-class Grad-CAM is not built). "
                             f"Received: class_names={list(class_names)}")


def explain_files(inputs: list[Path], model_dir: Path, max_file_mb: float = 64.0) -> ExplainResult:
    """Heatmaps of image files (or folders of them) through an exported end-to-end model.

    Raises:
        FeatcacheError, DamagedFileError: ``model_dir`` is not an untouched export.
        DataError: no input could be read.
    """
    from featcache.data import decode_bytes, scaled_decode
    from featcache.integrity import load_keras_checked
    from featcache.modelcard import CARD_FILE, KERAS_FILE, read_card
    from featcache.predict import FIX, find_inputs, read_regular_file

    card = read_card(model_dir, FIX)
    _check_binary(card["class_names"], str(model_dir), card.get("task"))
    model = load_keras_checked(model_dir / KERAS_FILE, card["files"]["keras_sha256"], model_dir / CARD_FILE, FIX)
    files, skipped = find_inputs(inputs)
    kept, images = [], []
    for file in files:
        try:
            images.append(decode_bytes(read_regular_file(file, int(max_file_mb * 2**20)), card["image_size"],
                                       name=str(file), scaled=scaled_decode(card["preprocessing"].get("decode_and_resize"))))
            kept.append(file)
        except DataError as exc:
            skipped.append({"path": str(file), "error": str(exc)})
    if not kept:
        raise DataError(f"No readable image among the inputs; expected JPEG or PNG files or folders of them. "
                        f"Received: inputs={[str(i) for i in inputs][:3]}")
    images = np.stack(images)
    heatmaps, probs = gradcam(model.layers[-1], end_to_end_maps(model, images))
    names, threshold = card["class_names"], float(card["threshold"])
    explanations = [Explanation(str(file), None, float(prob), names[int(prob >= threshold)], heatmap, image)
                    for file, heatmap, prob, image in zip(kept, heatmaps, probs, images)]
    return ExplainResult(explanations, skipped, f"model {model_dir}", None, card["positive_class"])


def write_explanations(result: ExplainResult, out: Path) -> list[Path]:
    """One PNG overlay per image with an image, and ``heatmaps.json`` with every raw heatmap, under ``out``."""
    from featcache.plots import plot_heatmap

    out.mkdir(parents=True, exist_ok=True)
    written, used = [], set()
    for e in result.explanations:
        if e.image is None:
            continue
        name = _file_name(e.path, used)
        truth = f"true {e.label}, " if e.label is not None else ""
        title = f"{Path(e.path).name}\n{truth}predicted {e.predicted}, P({result.positive}) = {e.probability:.3f}"
        written.append(plot_heatmap(e.image, normalize(e.heatmap), title, out / name))
    (out / HEATMAPS_FILE).write_text(json.dumps(to_json(result), indent=1) + "\n")
    return written


def to_json(result: ExplainResult) -> dict:
    return {"source": result.source, "agreement": result.agreement, "skipped": result.skipped,
            "heatmap": "Grad-CAM of the head's logit: relu(sum_k alpha_k A_k), raw values, rows top to bottom",
            "images": [{"path": e.path, "label": e.label, "predicted": e.predicted, "probability": e.probability,
                        "heatmap": np.round(e.heatmap.astype(np.float64), 6).tolist()}
                       for e in result.explanations]}


def _file_name(path: str, used: set) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.replace("/", "__")).strip("._") or "image"
    name, n = f"{stem}.png", 1
    while name in used:
        n += 1
        name = f"{stem}-{n}.png"
    used.add(name)
    return name


def format_result(result: ExplainResult) -> str:
    lines = [f"{len(result.explanations)} heatmaps from {result.source}"]
    if result.agreement and result.agreement.get("max_abs_diff") is not None:
        a = result.agreement
        lines.append(f"  cached vs end-to-end heatmaps (scaled to [0, 1]) over {a['images']} images: max |diff| "
                     f"{a['max_abs_diff']:.2e} with the maps rounded to {a['cache_dtype']} as cached (tolerance "
                     f"{a['tolerance']:g}); {a['storage_max_abs_diff']:.2e} against float32 maps (the storage "
                     f"precision's effect)")
    for e in result.explanations:
        row, col = np.unravel_index(int(np.argmax(e.heatmap)), e.heatmap.shape)
        truth = f"true {e.label:<10} " if e.label is not None else ""
        lines.append(f"  {truth}predicted {e.predicted:<10} {e.probability:.4f}  peak ({row}, {col})  {e.path}")
    return "\n".join(lines)
