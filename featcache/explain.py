"""``featcache explain``: Grad-CAM heatmaps of the head's decision, per image, as PNG overlays and JSON.

Two sources, one arithmetic (``gradcam.gradcam``):

- cached rows (``--cache-dir``, ``--backbone``, ``--split``): the maps come from the cache, no backbone runs;
  the raw file is read only to draw the overlay. With ``check`` (the default) the end-to-end model also
  computes each heatmap from the raw file, and the largest difference between the two (on heatmaps scaled
  to [0, 1]) must stay within ``HEATMAP_TOLERANCE`` of the cache's dtype, as the parity check does for
  probabilities.
- new files (``--model``, an export folder): the exported end-to-end model computes the maps.

A binary head's heatmap is of its positive class's logit. A multi-class head's is of the predicted class's logit
(the argmax), or of the class named by ``class_name`` (``--class NAME``) for every image.
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
    probability: float  # of the explained class (binary: the positive class)
    predicted: str  # the class at the head's threshold (multi-class: the argmax)
    heatmap: np.ndarray  # (h, w) raw Grad-CAM values
    image: np.ndarray | None = field(default=None, repr=False)  # (s, s, 3) uint8, for the overlay
    explained: str | None = None  # the class whose logit the heatmap explains (multi-class heads)


@dataclass
class ExplainResult:
    explanations: list[Explanation]
    skipped: list[dict]
    source: str  # "cache <file>" or "model <folder>"
    agreement: dict | None  # cached vs end-to-end heatmaps, when checked
    positive: str  # the positive class, whose probability and heatmap these are (multi-class: the --class
    # asked for, or "the predicted class")


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
                   check: bool = True, class_name: str | None = None) -> ExplainResult:
    """Heatmaps of the first ``limit`` original images of ``split`` in a cache, from their cached maps;
    ``class_name``: the class to explain (multi-class heads; default the predicted class of each image).

    Raises:
        FeatcacheError: no trained head for the cache, an unknown split, no image of that split, or an unknown
            ``class_name``.
        CacheMismatchError: the head does not belong to the cache.
        FeatcacheError: ``check`` and a heatmap differs from the end-to-end one by more than the tolerance.
    """
    from featcache.assemble import assemble_model
    from featcache.runs import check_head_matches_cache, load_head_record

    record = load_head_record(cache_path)
    manifest = check_head_matches_cache(record, cache_path)
    target = class_target(manifest["class_names"], class_name, Path(cache_path).name, manifest.get("task"))
    data_dir = Path(data_dir) if data_dir is not None else Path(manifest["data_dir"])
    paths, labels, maps = cached_rows(cache_path, split, limit=limit)
    assembled = assemble_model(cache_path, record, manifest)
    explanations, skipped = explain_maps(assembled, data_dir, paths, labels, maps, target)
    agreement = _check_agreement(assembled, explanations, manifest["dtype"]) if check else None
    return ExplainResult(explanations, skipped, f"cache {Path(cache_path).name}", agreement,
                         _explained_name(manifest["class_names"], target))


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


def explain_maps(assembled, data_dir: Path, paths: list[str], labels: np.ndarray, maps: np.ndarray,
                 target: int | None = None) -> tuple[list[Explanation], list[dict]]:
    """Heatmaps of cached maps with the raw images (from ``data_dir``) for the overlays; an unreadable raw file
    keeps its heatmap and is listed (no overlay). ``target``: the class index to explain (multi-class heads;
    None: each image's predicted class)."""
    from featcache.decode import load_image, scaled_decode

    manifest, record = assembled.manifest, assembled.record
    heatmaps, probs = gradcam(assembled.head, maps, target=target)
    names, threshold = manifest["class_names"], float(record["threshold"])
    explanations, skipped = [], []
    for path, label, heatmap, prob in zip(paths, labels, heatmaps, probs):
        try:
            image = load_image(Path(data_dir) / path, manifest["image_size"], scaled=scaled_decode(manifest.get("resize")))
        except DataError as exc:  # the heatmap stands; only the overlay is lost
            skipped.append({"path": path, "error": f"no overlay: {exc}"})
            image = None
        explanations.append(_explanation(path, names[int(label)], prob, names, threshold, heatmap, image, target))
    return explanations, skipped


def _explanation(path: str, label: str | None, prob: np.ndarray, names: list[str], threshold: float,
                 heatmap: np.ndarray, image, target: int | None) -> Explanation:
    if np.ndim(prob) == 0:  # binary: P(positive class) at the head's threshold
        return Explanation(path, label, float(prob), names[int(prob >= threshold)], heatmap, image)
    explained = int(np.argmax(prob)) if target is None else int(target)
    return Explanation(path, label, float(prob[explained]), names[int(np.argmax(prob))], heatmap, image,
                       explained=names[explained])


def class_target(class_names: list[str], class_name: str | None, source: str, task: str | None = None) -> int | None:
    """The class index ``--class`` names for a multi-class head (None: each image's predicted class); a binary
    head explains its positive class, which is the only name it takes.

    Raises:
        FeatcacheError: a multi-label head, a name that is not one of ``class_names``, or a binary head's negative
            class.
    """
    if task == "multilabel":  # even with two labels: no single positive class to explain
        raise FeatcacheError(f"explain draws the heatmap of one class; {source} is a multi-label model of "
                             f"{len(class_names)} labels (multi-label Grad-CAM is not built). "
                             f"Received: labels={list(class_names)}")
    if class_name is None:
        return None
    if len(class_names) <= 2:
        if class_name == class_names[-1]:
            return None
        raise FeatcacheError(f"A binary head's heatmap is of its positive class {class_names[-1]!r}; --class picks a "
                             f"class of a multi-class head ({source}). Received: class_name={class_name!r}")
    if class_name not in class_names:
        raise FeatcacheError(f"--class must be one of {', '.join(class_names)} ({source}). "
                             f"Received: class_name={class_name!r}")
    return list(class_names).index(class_name)


def _explained_name(class_names: list[str], target: int | None) -> str:
    if len(class_names) <= 2:
        return class_names[1]
    return "the predicted class" if target is None else class_names[target]


def _check_agreement(assembled, explanations: list[Explanation], dtype: str) -> dict:
    """Heatmaps recomputed end to end from the decoded raw images, against the cached ones (see
    ``HEATMAP_TOLERANCE``): ``max_abs_diff`` with the end-to-end maps rounded to the cache's dtype (checked),
    ``storage_max_abs_diff`` with them in float32 (the storage precision's effect, reported)."""
    with_image = [e for e in explanations if e.image is not None]
    tolerance = HEATMAP_TOLERANCE[dtype]
    if not with_image:
        return {"images": 0, "max_abs_diff": None, "storage_max_abs_diff": None, "tolerance": tolerance}
    maps = end_to_end_maps(assembled.model, np.stack([e.image for e in with_image]))
    names = assembled.manifest["class_names"]  # multi-class: the classes the cached heatmaps explain, image by image
    target = None if len(names) <= 2 else np.array([names.index(e.explained) for e in with_image])
    stored, _ = gradcam(assembled.head, maps.astype(dtype).astype(np.float32), target=target)
    full, _ = gradcam(assembled.head, maps, target=target)
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


def explain_files(inputs: list[Path], model_dir: Path, max_file_mb: float = 64.0,
                  class_name: str | None = None) -> ExplainResult:
    """Heatmaps of image files (or folders of them) through an exported end-to-end model; ``class_name`` as
    ``explain_cached``.

    Raises:
        FeatcacheError, DamagedFileError: ``model_dir`` is not an untouched export.
        DataError: no input could be read.
    """
    from featcache.decode import decode_bytes, scaled_decode
    from featcache.integrity import load_keras_checked
    from featcache.modelcard import CARD_FILE, KERAS_FILE, read_card
    from featcache.predict import FIX, find_inputs, read_regular_file

    card = read_card(model_dir, FIX)
    target = class_target(card["class_names"], class_name, str(model_dir), card.get("task"))
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
    heatmaps, probs = gradcam(model.layers[-1], end_to_end_maps(model, images), target=target)
    names, threshold = card["class_names"], float(card["threshold"])
    explanations = [_explanation(str(file), None, prob, names, threshold, heatmap, image, target)
                    for file, heatmap, prob, image in zip(kept, heatmaps, probs, images)]
    positive = card["positive_class"] if len(names) <= 2 else _explained_name(names, target)
    return ExplainResult(explanations, skipped, f"model {model_dir}", None, positive)


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
        explained = e.explained or result.positive
        title = (f"{Path(e.path).name}\n{truth}predicted {e.predicted}, "
                 + (f"heatmap of {explained}, " if e.explained else "") + f"P({explained}) = {e.probability:.3f}")
        written.append(plot_heatmap(e.image, normalize(e.heatmap), title, out / name))
    (out / HEATMAPS_FILE).write_text(json.dumps(to_json(result), indent=1) + "\n")
    return written


def to_json(result: ExplainResult) -> dict:
    return {"source": result.source, "agreement": result.agreement, "skipped": result.skipped,
            "heatmap": "Grad-CAM of the head's logit: relu(sum_k alpha_k A_k), raw values, rows top to bottom",
            "images": [{"path": e.path, "label": e.label, "predicted": e.predicted, "probability": e.probability,
                        **({"explained": e.explained} if e.explained else {}),
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
        explained = f"heatmap of {e.explained:<10} " if e.explained else ""
        lines.append(f"  {truth}predicted {e.predicted:<10} {explained}{e.probability:.4f}  peak ({row}, {col})  "
                     f"{e.path}")
    return "\n".join(lines)
