"""The plots are PNG files written atomically, whatever the inputs' sizes."""

import numpy as np

from featcache.plots import plot_confusions, plot_pr, plot_roc, plot_trials

PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_write_png_files_and_nothing_else(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40)
    curves = [("a", labels, rng.random(40)), ("b", labels, labels * 0.5 + rng.random(40) * 0.5)]
    rows = [{"number": i, "val_roc_auc": 0.5 + 0.04 * i, "pruned": i == 2} for i in range(5)]
    rows.append({"number": 5, "val_roc_auc": None, "pruned": True})  # a trial pruned before its first report
    written = [
        plot_roc(curves, tmp_path / "roc.png"),
        plot_pr(curves, tmp_path / "pr.png"),
        plot_confusions([("at t", [[3, 1], [2, 10]]), ("at 0.5", [[0, 4], [0, 12]])], ["NORMAL", "PNEUMONIA"],
                        tmp_path / "confusion.png"),
        plot_trials(rows, tmp_path / "trials.png"),
    ]
    for path in written:
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.png", "pr.png", "roc.png", "trials.png"]
