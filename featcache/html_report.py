"""report.html: one self-contained HTML file per backbone and one for the comparison, readable offline.

Plain HTML and CSS, no JavaScript: every plot is a PNG embedded as a ``data:`` URI (the PNG files also stay
beside it), so the file can be mailed or archived alone. Every number comes from the report dictionaries
``evaluate`` writes to report.json; the gallery shows the test images the model gets most wrong with their
Grad-CAM heatmaps (``featcache.explain``), computed from the cached maps.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from featcache.metrics import METRICS
from featcache.reports import format_ci as _ci, format_value as _num

HTML_FILE = "report.html"
GALLERY_DIR = "gallery"
GALLERY_SIZE = 4  # false positives and false negatives shown, each
LABELS = {"accuracy": "Accuracy", "sensitivity": "Sensitivity", "specificity": "Specificity",
          "precision": "Precision", "f1": "F1", "roc_auc": "ROC-AUC", "pr_auc": "PR-AUC"}
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.warning { background: #fff3cd; border: 1px solid #e0c060; padding: 0.6rem 1rem; }
figure { display: inline-block; margin: 0.5rem; vertical-align: top; }
figure img { max-width: 100%; }
.gallery figure { width: 16rem; }
.gallery img { width: 16rem; }
figcaption { overflow-wrap: anywhere; font-size: 0.85rem; }
"""


def _esc(value) -> str:
    return html.escape(str(value))


def _image(path: Path, alt: str) -> str:
    """An embedded PNG (nothing when the file is missing)."""
    path = Path(path)
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{data}"><figcaption>{_esc(alt)}</figcaption></figure>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def most_wrong(report: dict, k: int = GALLERY_SIZE) -> dict[str, list[int]]:
    """Indices into ``report["predictions"]`` of the ``k`` most confident false positives (highest probability
    among true negatives called positive) and false negatives (lowest among true positives called negative)."""
    predictions, threshold = report["predictions"], report["at_threshold"]["threshold"]
    items = list(zip(predictions["label"], predictions["probability"]))
    fp = sorted((i for i, (y, p) in enumerate(items) if y == 0 and p >= threshold), key=lambda i: -items[i][1])
    fn = sorted((i for i, (y, p) in enumerate(items) if y == 1 and p < threshold), key=lambda i: items[i][1])
    return {"false_positives": fp[:k], "false_negatives": fn[:k]}


def render_backbone(report: dict, run_dir: Path, gallery: dict[str, list[tuple[dict, Path | None]]]) -> str:
    """The per-backbone page. ``gallery``: kind -> [(prediction {"path", "label", "probability"}, overlay PNG)]."""
    names, head, test = report["class_names"], report["head"], report["test"]
    at_t, at_half, base = report["at_threshold"], report["at_0.5"], report["baseline"]
    probe = report.get("probe")
    parts = [f"<h1>Evaluation: {_esc(report['backbone'])}</h1>"]
    if report["weights"]["source"] == "random":
        parts.append('<p class="warning"><strong>Random backbone weights.</strong> These figures only show that the '
                     "pipeline works; the model is not a classifier to use.</p>")
    parts.append(_table(["", ""], [
        ["cache", f"{report['cache_file']} ({report['dtype']} maps, {report['image_size']} px)"],
        ["head", f"trial {head['trial_number']} of {head['study_name']}: {head['params']}"],
        ["threshold", f"{head['threshold']:.4f} ({head['threshold_method']}, chosen on validation)"],
        ["test images", f"{test['images']} ({test['positives']} {names[1]}, {test['negatives']} {names[0]}), "
                        f"read from their raw files"],
        ["parity", f"max |end-to-end - cached| {report['parity']['max_abs_diff']:.2e} "
                   f"(tolerance {report['parity']['tolerance']:g})"],
        ["validation ROC-AUC", _num(report["validation"]["roc_auc"])],
    ]))
    parts.append(f"<h2>Test metrics</h2><p>95 % bootstrap intervals over {at_t['bootstrap']['resamples']} resamples "
                 "of the test images. Floors: the linear probe on the same features and the majority class.</p>")
    rows = [[LABELS[m], _ci(at_t["metrics"][m]), _ci(at_half["metrics"][m]),
             _ci(probe["test"]["metrics"][m]) if probe else "n/a", _num(base["metrics"][m])] for m in METRICS]
    parts.append(_table(["metric", f"at threshold {at_t['threshold']:.3f}", "at 0.5", "linear probe at 0.5",
                         f"majority ({names[base['class_index']]})"], rows))
    if probe and probe["head_below_probe_on_validation"]:
        parts.append('<p class="warning">The tuned head is below the linear probe on validation.</p>')
    calibration = report.get("calibration")
    if calibration:
        parts.append("<h2>Calibration</h2>" + _table(["", "value [95 % CI]"], [
            ["Brier score", _ci(calibration["metrics"]["brier"])],
            ["expected calibration error (10 bins)", _ci(calibration["metrics"]["ece"])]]))
    parts.append(_posthoc(report))
    parts.append("<h2>Plots</h2>" + "".join(_image(run_dir / f, alt) for f, alt in (
        ("roc.png", "ROC curve"), ("pr.png", "precision-recall curves (the head, and the linear probe when fitted)"),
        ("confusion.png", "confusion matrices at the threshold and at 0.5"),
        ("calibration.png", "reliability diagram and scores per class"),
        ("calibration-calibrated.png", "reliability diagram of the calibrated probabilities"),
        ("trials.png", "head search trials: validation ROC-AUC per trial"))))
    parts.append(_gallery(gallery, names))
    return _page(f"featcache evaluation: {report['backbone']}", "\n".join(parts))


def _posthoc(report: dict) -> str:
    """The post-hoc calibration fitted on validation (``train-head --calibrate``), when there is one."""
    from featcache.posthoc import describe_calibration

    record = report.get("post_hoc_calibration")
    if not record:
        return ""
    rows = [["method", describe_calibration(record)]]
    calibrated = report.get("calibrated")
    if calibrated:
        rows += [["model output", "the uncalibrated score (the figures above); the calibrated probability is the "
                                  f"{record['method']} lookup of it"],
                 ["calibrated: Brier score", _ci(calibrated["metrics"]["brier"])],
                 ["calibrated: expected calibration error", _ci(calibrated["metrics"]["ece"])]]
    return "<h2>Post-hoc calibration (fitted on validation)</h2>" + _table(["", ""], rows)


def _gallery(gallery: dict, names: list[str]) -> str:
    titles = {"false_positives": f"Most confident false positives (true {names[0]}, called {names[1]})",
              "false_negatives": f"Most confident false negatives (true {names[1]}, called {names[0]})"}
    parts = ["<h2>Where the model is most wrong</h2><p>Grad-CAM heatmaps of the head's decision, from the cached "
             "maps, over the decoded test images.</p>"]
    for kind, title in titles.items():
        items = gallery.get(kind, [])
        parts.append(f"<h3>{_esc(title)}</h3>")
        if not items:
            parts.append("<p>None.</p>")
            continue
        figures = []
        for prediction, overlay in items:
            caption = f"{prediction['path']}: P({names[1]}) = {prediction['probability']:.3f}"
            figures.append(_image(overlay, caption) if overlay is not None else f"<p>{_esc(caption)} (no image)</p>")
        parts.append('<div class="gallery">' + "".join(figures) + "</div>")
    return "\n".join(parts)


def render_comparison(reports: list[dict], selection: dict, runs_dir: Path) -> str:
    """The comparison page: one row per backbone, the selection, the ROC curves, links to each page."""
    rows = []
    for r in sorted(reports, key=lambda r: r["cache_file"]):
        m, calibration, probe = r["at_threshold"]["metrics"], r.get("calibration"), r.get("probe")
        rows.append([r["backbone"] + (" (selected)" if r["cache_file"] == selection["cache_file"] else ""),
                     _num(r["validation"]["roc_auc"]),
                     "argmax" if r.get("task") == "multiclass" else f"{r['at_threshold']['threshold']:.3f}",
                     _ci(m["accuracy"]),
                     _ci(m["roc_auc"]), _ci(m["sensitivity"]), _ci(m["specificity"]),
                     _ci(calibration["metrics"]["brier"]) if calibration else "n/a",
                     _ci(probe["test"]["metrics"]["roc_auc"]) if probe else "n/a"])
    links = "".join(f'<li><a href="{_esc(Path(r["cache_file"]).stem)}/{HTML_FILE}">{_esc(r["backbone"])}</a></li>'
                    for r in sorted(reports, key=lambda r: r["cache_file"]))
    body = [f"<h1>Backbone comparison</h1><p>Selected for export: <strong>{_esc(selection['backbone'])}</strong> "
            f"({_esc(selection['cache_file'])}): {_esc(selection['criterion'])}.</p>",
            _table(["backbone", "val ROC-AUC", "threshold", "test accuracy", "test ROC-AUC", "sensitivity",
                    "specificity", "Brier", "probe test ROC-AUC"], rows),
            "<p>Brackets: 95 % bootstrap intervals. Test scores are reported, never used to choose.</p>",
            _image(runs_dir / "roc.png", "test ROC, all backbones"),
            _image(runs_dir / "pr.png", "test precision-recall, all backbones"), f"<h2>Per backbone</h2><ul>{links}</ul>"]
    return _page("featcache backbone comparison", "\n".join(body))


def write_backbone_html(report: dict, run_dir: Path, cache_path: Path, assembled, data_dir: Path) -> Path:
    """The gallery overlays (``<run_dir>/gallery/``, made anew) and ``<run_dir>/report.html``."""
    import shutil

    from featcache.evaluate import write_atomic
    from featcache.explain import cached_rows, explain_maps
    from featcache.gradcam import normalize
    from featcache.plots import plot_heatmap

    predictions, names = report["predictions"], report["class_names"]
    folder = Path(run_dir) / GALLERY_DIR
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    wrong = most_wrong(report)
    indices = [i for kind_indices in wrong.values() for i in kind_indices]
    paths = [predictions["path"][i] for i in indices]  # one read of the cache for both kinds
    explained = explain_maps(assembled, data_dir, *cached_rows(cache_path, "test", paths=paths))[0] if paths else []
    by_index = dict(zip(indices, explained))
    gallery = {}
    for kind, kind_indices in wrong.items():
        items = []
        for n, i in enumerate(kind_indices):
            e = by_index[i]
            prediction = {key: predictions[key][i] for key in ("path", "label", "probability")}
            overlay = None
            if e.image is not None:
                title = f"{Path(e.path).name}\ntrue {e.label}, P({names[1]}) = {e.probability:.3f}"
                overlay = plot_heatmap(e.image, normalize(e.heatmap), title, folder / f"{kind}-{n}.png")
            items.append((prediction, overlay))
        gallery[kind] = items
    path = Path(run_dir) / HTML_FILE
    write_atomic(path, render_backbone(report, Path(run_dir), gallery))
    return path
