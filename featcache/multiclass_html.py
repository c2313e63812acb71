"""report.html of a multi-class head: the binary page's look (``featcache.html_report``: self-contained, plots
embedded as PNG data URIs, no JavaScript) with the multi-class content: macro and per-class metrics with
bootstrap intervals beside the floors (the majority class, the multinomial probe), the confusion matrix as a
table, one-vs-rest ROC and precision-recall curves, the calibration of the top-class confidence, and the most
confident mistakes with the Grad-CAM heatmap of the class the model called.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.html_report import GALLERY_DIR, GALLERY_SIZE, HTML_FILE, LABELS, _esc, _image, _page, _posthoc, _table
from featcache.multiclass_eval import MACRO, PER_CLASS
from featcache.reports import format_ci as _ci, format_value as _num

PLOTS = (("roc.png", "one-vs-rest ROC curves, per class"),
         ("pr.png", "one-vs-rest precision-recall curves, per class"),
         ("confusion.png", "confusion matrix at the argmax"),
         ("calibration.png", "reliability of the top-class confidence"),
         ("trials.png", "head search trials: validation macro ROC-AUC per trial"))


def most_confident_mistakes(report: dict, k: int = GALLERY_SIZE) -> list[int]:
    """Indices into ``report["predictions"]`` of the ``k`` test images called wrong with the highest top-class
    probability."""
    predictions = report["predictions"]
    probs, labels = np.asarray(predictions["probability"]), np.asarray(predictions["label"])
    if not len(labels):
        return []
    called = probs.argmax(axis=1)
    wrong = np.flatnonzero(called != labels)
    return wrong[np.argsort(-probs[wrong].max(axis=1), kind="stable")][:k].tolist()


def render_multiclass(report: dict, run_dir: Path, gallery: list[tuple[dict, Path | None]] | None = None) -> str:
    """The per-backbone page of a multi-class head. ``gallery``: [(prediction {"path", "label", "called",
    "probability"}, overlay PNG or None)]."""
    names, head, test, scored = report["class_names"], report["head"], report["test"], report["at_threshold"]
    parts = [f"<h1>Evaluation: {_esc(report['backbone'])}, {len(names)} classes</h1>"]
    if report["weights"]["source"] == "random":
        parts.append('<p class="warning"><strong>Random backbone weights.</strong> These figures only show that the '
                     "pipeline works; the model is not a classifier to use.</p>")
    counts = ", ".join(f"{test['per_class'][n]} {n}" for n in names)
    parts.append(_table(["", ""], [
        ["cache", f"{report['cache_file']} ({report['dtype']} maps, {report['image_size']} px)"],
        ["head", f"trial {head['trial_number']} of {head['study_name']}: {head['params']}"],
        ["decision", "the class of highest probability (argmax); no threshold"],
        ["test images", f"{test['images']} ({counts}), read from their raw files"],
        ["parity", f"max |end-to-end - cached| {report['parity']['max_abs_diff']:.2e} "
                   f"(tolerance {report['parity']['tolerance']:g})"],
        ["validation macro ROC-AUC", _num(report["validation"]["roc_auc"])],
    ]))
    parts += _metrics(report)
    parts.append("<h2>Confusion matrix</h2><p>Rows: true class; columns: the class called (argmax).</p>" + _table(
        ["true \\ called", *names], [[name, *map(str, row)] for name, row in zip(names, scored["confusion"]["matrix"])]))
    parts.append(_calibration(report))
    parts.append(_posthoc(report))
    parts.append("<h2>Plots</h2>" + "".join(_image(Path(run_dir) / f, alt) for f, alt in PLOTS))
    parts.append(_gallery(gallery or [], names))
    return _page(f"featcache evaluation: {report['backbone']}", "\n".join(parts))


def _metrics(report: dict) -> list[str]:
    names, scored, probe, base = report["class_names"], report["at_threshold"], report.get("probe"), report["baseline"]
    p_scored = probe["test"] if probe else None
    parts = [f"<h2>Test metrics</h2><p>95 % bootstrap intervals over {scored['bootstrap']['resamples']} resamples of "
             "the test images. Macro: the unweighted mean over classes of each class's one-vs-rest figure. Floors: "
             "the multinomial linear probe on the same features and the training majority class.</p>"]
    rows = [[f"{LABELS[m]}" + ("" if m == "accuracy" else " (macro)"), _ci(scored["metrics"][m]),
             _ci(p_scored["metrics"][m]) if p_scored else "n/a", _num(base["metrics"][m])] for m in MACRO]
    parts.append(_table(["metric", "head", "linear probe", f"majority ({names[base['class_index']]})"], rows))
    if probe and probe["head_below_probe_on_validation"]:
        parts.append('<p class="warning">The tuned head is below the linear probe on validation.</p>')
    rows = []
    for name in names:
        c = scored["per_class"][name]
        rows.append([name, str(c["images"]), *(_ci(c[m]) for m in PER_CLASS),
                     _ci(p_scored["per_class"][name]["roc_auc"]) if p_scored else "n/a"])
    parts.append("<h3>Per class (one vs rest)</h3>" + _table(
        ["class", "images", "ROC-AUC", "sensitivity (recall)", "specificity", "linear probe ROC-AUC"], rows))
    return parts


def _calibration(report: dict) -> str:
    calibration = report.get("calibration")
    if not calibration:
        return ""
    m = calibration["metrics"]
    return ("<h2>Calibration</h2><p>Of the top-class confidence (the largest probability), "
            f"{calibration['n_bins']} equal-width bins.</p>" + _table(["", "value [95 % CI]"], [
                ["expected calibration error (top-class)", _ci(m["ece"])],
                ["Brier score (sum over classes, 0 to 2)", _ci(m["brier"])],
                ["negative log-likelihood", _ci(m["nll"])]]))


def _gallery(gallery: list, names: list[str]) -> str:
    parts = ["<h2>Where the model is most wrong</h2><p>The test images called wrong with the highest confidence, "
             "with the Grad-CAM heatmap of the class called, from the cached maps, over the decoded image.</p>"]
    if not gallery:
        return parts[0] + "<p>None.</p>"
    figures = []
    for prediction, overlay in gallery:
        caption = (f"{prediction['path']}: true {prediction['label']}, called {prediction['called']} "
                   f"(P = {prediction['probability']:.3f})")
        figures.append(_image(overlay, caption) if overlay is not None else f"<p>{_esc(caption)} (no image)</p>")
    return parts[0] + '<div class="gallery">' + "".join(figures) + "</div>"


def write_multiclass_html(report: dict, run_dir: Path, cache_path: Path | None = None, assembled=None,
                          data_dir: Path | None = None) -> Path:
    """``<run_dir>/report.html`` (and the gallery overlays under ``<run_dir>/gallery/``, made anew, when the
    cache and the reassembled model are given)."""
    import shutil

    from featcache.evaluate import write_atomic

    folder = Path(run_dir) / GALLERY_DIR
    shutil.rmtree(folder, ignore_errors=True)
    gallery = _overlays(report, folder, cache_path, assembled, data_dir) if assembled is not None else []
    path = Path(run_dir) / HTML_FILE
    write_atomic(path, render_multiclass(report, Path(run_dir), gallery))
    return path


def _overlays(report: dict, folder: Path, cache_path: Path, assembled, data_dir: Path) -> list:
    """The most confident mistakes, each with its Grad-CAM overlay of the class called (cached maps)."""
    from featcache.explain import cached_rows, explain_maps
    from featcache.gradcam import normalize
    from featcache.plots import plot_heatmap

    indices = most_confident_mistakes(report)
    if not indices:
        return []
    folder.mkdir()
    predictions, names = report["predictions"], report["class_names"]
    paths = [predictions["path"][i] for i in indices]
    explained, _ = explain_maps(assembled, data_dir, *cached_rows(cache_path, "test", paths=paths))
    gallery = []
    for n, (i, e) in enumerate(zip(indices, explained)):
        probs = predictions["probability"][i]
        called = int(np.argmax(probs))
        prediction = {"path": predictions["path"][i], "label": names[predictions["label"][i]], "called": names[called],
                      "probability": float(probs[called])}
        overlay = None
        if e.image is not None:
            title = f"{Path(e.path).name}\ntrue {e.label}, called {e.predicted}, heatmap of {e.explained}"
            overlay = plot_heatmap(e.image, normalize(e.heatmap), title, folder / f"mistake-{n}.png")
        gallery.append((prediction, overlay))
    return gallery
