"""Head quality against its floors, per backbone, from the run folders of a finished pipeline.

Reads what ``featcache train-head`` and ``featcache evaluate`` wrote (head.json, trials.jsonl,
report.json) and prints, side by side: the chosen head's validation and test ROC-AUC, the linear
probe's, the difference, and how many trials collapsed. The targets (issue 7): validation ROC-AUC
>= 0.90, test ROC-AUC no more than 0.02 below the probe's, fewer than 3 of 20 trials collapsed.

Reproduce (README's first command, then this):
    featcache extract --data ../shared/data/chest_xray_dev --weights random && featcache train-head --trials 20 \
        && featcache evaluate && python benchmarks/head_quality.py --cache-dir cache
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def quality_rows(cache_dir: Path) -> list[dict]:
    rows = []
    for run_dir in sorted((cache_dir / "runs").iterdir()):
        head_file, report_file = run_dir / "head.json", run_dir / "report.json"
        if not head_file.is_file() or not report_file.is_file():
            continue
        head, report = json.loads(head_file.read_text()), json.loads(report_file.read_text())
        trials = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines() if line.strip()]
        probe = report["probe"]
        test_auc = report["at_threshold"]["metrics"]["roc_auc"]["value"]
        probe_auc = probe["test"]["metrics"]["roc_auc"]["value"]
        rows.append({
            "backbone": head["backbone"], "trials": len(trials), "collapsed": sum(t["collapsed"] for t in trials),
            "pruned": sum(t["pruned"] for t in trials), "best_trial": head["trial_number"],
            "standardize": head["params"].get("standardize", False),
            "val_auc": head["val_metrics"]["roc_auc"], "probe_val_auc": probe["validation"]["roc_auc"],
            "test_auc": test_auc, "probe_test_auc": probe_auc, "test_minus_probe": test_auc - probe_auc,
            "reference_val_auc": next((t["val_roc_auc"] for t in trials if t["number"] == 0), None),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path("cache"))
    args = parser.parse_args()
    rows = quality_rows(args.cache_dir)
    if not rows:
        raise SystemExit(f"no evaluated head in {args.cache_dir}/runs; run train-head and evaluate first")
    print(f"{'backbone':<10} {'trials':>6} {'collapsed':>9} {'pruned':>6} {'best':>4} {'std':>3} {'ref_val':>7} "
          f"{'val_auc':>7} {'probe_val':>9} {'test_auc':>8} {'probe_test':>10} {'test-probe':>10}")
    for r in rows:
        print(f"{r['backbone']:<10} {r['trials']:>6} {r['collapsed']:>9} {r['pruned']:>6} {r['best_trial']:>4} "
              f"{'y' if r['standardize'] else 'n':>3} {r['reference_val_auc']:>7.4f} {r['val_auc']:>7.4f} "
              f"{r['probe_val_auc']:>9.4f} {r['test_auc']:>8.4f} {r['probe_test_auc']:>10.4f} "
              f"{r['test_minus_probe']:>+10.4f}")
    ok = all(r["val_auc"] >= 0.90 and r["test_minus_probe"] >= -0.02 and r["collapsed"] < 3 for r in rows)
    print("targets (val >= 0.90, test >= probe - 0.02, < 3 collapsed):", "met" if ok else "NOT met")


if __name__ == "__main__":
    main()
