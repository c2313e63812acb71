"""PNG plots of an evaluation: ROC curves, confusion matrices, the trial history of the head search.

Figures are made with ``matplotlib.figure.Figure`` and the Agg canvas, never pyplot, so no display
and no global backend state are involved. Each file is written under a temporary name and renamed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _save(figure, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_roc(curves: list[tuple[str, np.ndarray, np.ndarray]], path: Path, title: str = "Test ROC") -> Path:
    """ROC curves, one per ``(name, labels (n,), probs (n,))``, with their AUC in the legend."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    figure = Figure(figsize=(5, 5))
    axes = figure.add_subplot()
    for name, labels, probs in curves:
        fpr, tpr, _ = roc_curve(labels, probs)
        axes.plot(fpr, tpr, lw=1.8, label=f"{name} (AUC {roc_auc_score(labels, probs):.3f})")
    axes.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    axes.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
             xlim=(0, 1), ylim=(0, 1.01), title=title)
    axes.legend(loc="lower right", fontsize=8)
    return _save(figure, path)


def plot_pr(curves: list[tuple[str, np.ndarray, np.ndarray]], path: Path, title: str = "Test precision-recall",
            no_skill: bool = True) -> Path:
    """Precision-recall curves, one per ``(name, labels (n,), probs (n,))``, with their average precision in the
    legend, and the precision of a classifier without skill (the prevalence of class 1) as a dashed line; without
    ``no_skill`` (one-vs-rest curves of several classes, each of its own prevalence), each curve's prevalence is
    in its legend instead."""
    from matplotlib.figure import Figure
    from sklearn.metrics import average_precision_score, precision_recall_curve

    figure = Figure(figsize=(5, 5))
    axes = figure.add_subplot()
    for name, labels, probs in curves:
        precision, recall, _ = precision_recall_curve(labels, probs)
        prevalence = "" if no_skill else f", prevalence {np.mean(labels):.3f}"
        axes.step(recall, precision, where="post", lw=1.8,
                  label=f"{name} (AP {average_precision_score(labels, probs):.3f}{prevalence})")
    if curves and no_skill:
        prevalence = float(np.mean(curves[0][1]))
        axes.axhline(prevalence, ls="--", color="grey", lw=1, label=f"no skill ({prevalence:.3f})")
    axes.set(xlabel="recall (sensitivity)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01), title=title)
    axes.legend(loc="lower left", fontsize=8)
    return _save(figure, path)


def plot_confusions(matrices: list[tuple[str, list[list[int]]]], class_names: list[str], path: Path) -> Path:
    """Side-by-side 2x2 confusion matrices (rows: true class, columns: predicted), counts annotated."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.8 * len(matrices), 4), layout="constrained")
    for i, (title, matrix) in enumerate(matrices):
        axes = figure.add_subplot(1, len(matrices), i + 1)
        matrix = np.asarray(matrix)
        axes.imshow(matrix, cmap="Blues", vmin=0)
        for (row, col), count in np.ndenumerate(matrix):
            dark = count > matrix.max() / 2
            axes.text(col, row, str(count), ha="center", va="center", color="white" if dark else "black")
        axes.set(xticks=[0, 1], yticks=[0, 1], xticklabels=class_names, yticklabels=class_names,
                 xlabel="predicted", ylabel="true", title=title)
    return _save(figure, path)


def plot_trials(rows: list[dict], path: Path, title: str = "Head search") -> Path:
    """Validation ROC-AUC of each trial (pruned ones hollow) and the best so far."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5))
    axes = figure.add_subplot()
    rows = sorted((r for r in rows if r.get("val_roc_auc") is not None), key=lambda r: r["number"])
    done = [r for r in rows if not r.get("pruned")]
    pruned = [r for r in rows if r.get("pruned")]
    axes.scatter([r["number"] for r in done], [r["val_roc_auc"] for r in done], s=22, label="complete")
    if pruned:
        axes.scatter([r["number"] for r in pruned], [r["val_roc_auc"] for r in pruned], s=22, facecolors="none",
                     edgecolors="grey", label="pruned (last reported)")
    if done:
        best = np.maximum.accumulate([r["val_roc_auc"] for r in done])
        axes.step([r["number"] for r in done], best, where="post", color="C1", label="best so far")
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set(xlabel="trial", ylabel="validation ROC-AUC", title=title)
    axes.legend(loc="lower right", fontsize=8)
    return _save(figure, path)


def plot_run_trials(run_dir: Path, backbone: str) -> Path | None:
    """trials.png of a run folder, from its trials.jsonl (one trial a line), when there is one."""
    import json

    trials = Path(run_dir) / "trials.jsonl"
    if not trials.is_file():
        return None
    rows = [json.loads(line) for line in trials.read_text().splitlines() if line.strip()]
    return plot_trials(rows, Path(run_dir) / "trials.png", f"Head search, {backbone}")


def plot_calibration(labels: np.ndarray, probs: np.ndarray, bins: list[dict], class_names: list[str], path: Path,
                     title: str = "Calibration") -> Path:
    """Reliability diagram (fraction positive against mean probability per bin, bin counts as bars) beside a
    histogram of the scores of each true class. ``bins`` as ``calibration.reliability_bins``."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    figure, histogram = _reliability_figure(bins, "mean_prob", "fraction_positive",
                                            f"mean predicted probability of {class_names[1]}",
                                            f"fraction {class_names[1]}", title)
    edges = np.linspace(0, 1, 21)
    for index, name in enumerate(class_names[:2]):
        histogram.hist(probs[labels == index], bins=edges, alpha=0.6, label=f"true {name}")
    histogram.set(xlabel=f"predicted probability of {class_names[1]}", ylabel="images",
                  title=f"{title}: scores per class")
    histogram.legend(loc="upper center", fontsize=8)
    return _save(figure, path)


def plot_confidence_reliability(probs: np.ndarray, bins: list[dict], path: Path, title: str = "Calibration") -> Path:
    """A multi-class reliability diagram: accuracy against mean top-class confidence per bin (bin counts as bars),
    beside a histogram of the top-class confidences. ``bins`` as ``multiclass_calibration.confidence_bins``."""
    figure, histogram = _reliability_figure(bins, "mean_confidence", "accuracy", "mean top-class confidence",
                                            "accuracy (argmax is the true class)", title)
    histogram.hist(np.asarray(probs).max(axis=1), bins=np.linspace(0, 1, 21), color="C0", alpha=0.7)
    histogram.set(xlabel="top-class confidence", ylabel="images", title=f"{title}: confidence")
    return _save(figure, path)


def _reliability_figure(bins: list[dict], x: str, y: str, xlabel: str, ylabel: str, title: str):
    """(figure, histogram axes): a reliability diagram on the left (bin ``y`` against bin ``x`` for each bin
    holding images, the diagonal, bin counts as bars), the right axes left to the caller."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.2), layout="constrained")
    reliability, histogram = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    full = [b for b in bins if b["count"]]
    reliability.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    reliability.plot([b[x] for b in full], [b[y] for b in full], "o-", color="C0", label="model")
    counts = reliability.twinx()
    counts.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["count"] for b in bins],
               width=bins[0]["high"] - bins[0]["low"], alpha=0.15, color="C0")
    counts.set_ylabel("images per bin")
    reliability.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.01), title=f"{title}: reliability")
    reliability.legend(loc="upper left", fontsize=8)
    return figure, histogram


def plot_heatmap(image: np.ndarray, heatmap: np.ndarray, title: str, path: Path) -> Path:
    """The (s, s, 3) uint8 image with a [0, 1] Grad-CAM heatmap upsampled onto it (bilinear), and a colour bar."""
    from matplotlib.figure import Figure

    from featcache.gradcam import upsample

    size = image.shape[0]
    figure = Figure(figsize=(5, 5.3), layout="constrained")
    axes = figure.add_subplot()
    axes.imshow(image, interpolation="nearest")
    overlay = axes.imshow(upsample(heatmap, size), cmap="jet", alpha=0.4, vmin=0, vmax=1, extent=(-0.5, size - 0.5,
                                                                                                    size - 0.5, -0.5))
    figure.colorbar(overlay, ax=axes, fraction=0.046, pad=0.02, label="Grad-CAM (scaled to its maximum)")
    axes.set_title(title, fontsize=9)
    axes.set_axis_off()
    return _save(figure, path)
