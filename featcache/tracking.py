"""Optional experiment tracking with MLflow (``--mlflow URI`` or ``FEATCACHE_MLFLOW_URI``): ``train-head`` logs
a run per backbone with a nested run per trial (parameters, per-epoch validation metrics), ``evaluate`` a run
with the comparison page and a nested run per backbone (test metrics, report files as artifacts).

MLflow is imported only when a URI is given; without one every function here is a no-op and MLflow need not
be installed (``pip install 'featcache[mlflow]'``). Everything goes through ``MlflowClient`` with explicit
run ids, never MLflow's global active run, so nothing leaks between backbones or into a caller's own runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

from featcache.errors import FeatcacheError

log = logging.getLogger(__name__)

ENV_VAR = "FEATCACHE_MLFLOW_URI"
EXPERIMENT = "featcache"
REPORT_FILES = ("report.html", "report.json", "report.md", "roc.png", "pr.png", "confusion.png", "calibration.png",
                "calibration-calibrated.png", "trials.png")
COMPARISON_FILES = ("report.html", "comparison.md", "selection.json", "roc.png", "pr.png")


def _client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise FeatcacheError(f"--mlflow needs MLflow; install it with: pip install 'featcache[mlflow]'. "
                             f"Received: mlflow={uri!r}") from None
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)


def _finite_metrics(values: dict, prefix: str = "") -> dict:
    """``{prefix + name: float}`` of the finite numbers among ``values`` (MLflow refuses NaN and None)."""
    out = {}
    for name, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{name}"] = float(value)
    return out


class Tracker:
    """One MLflow run (``run_id``) and the client that writes to it."""

    def __init__(self, client, experiment_id: str, run_id: str):
        self.client, self.experiment_id, self.run_id = client, experiment_id, run_id

    def log(self, params: dict | None = None, metrics: dict | None = None, step: int = 0, run_id: str | None = None):
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        self.client.log_batch(run_id or self.run_id,
                              metrics=[Metric(k, v, now, step) for k, v in _finite_metrics(metrics or {}).items()],
                              params=[Param(k, str(v)) for k, v in (params or {}).items()])

    def child(self, name: str) -> str:
        """A nested run (MLflow's ``mlflow.parentRunId`` tag), returned by id; end it with ``end``."""
        run = self.client.create_run(self.experiment_id, run_name=name, tags={"mlflow.parentRunId": self.run_id})
        return run.info.run_id

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_trial(self, number: int, params: dict, history: list[dict], final: dict, state: str) -> None:
        """A nested run per trial: its parameters, each epoch's validation metrics (step = epoch) and the final
        (restored best) validation metrics."""
        run_id = self.child(f"trial {number}")
        self.log(params={**params, "trial": number, "state": state}, metrics=_finite_metrics(final, "val_"),
                 run_id=run_id)
        for row in history:
            epoch = int(row.get("epoch", 0))
            self.log(metrics=_finite_metrics({k: v for k, v in row.items() if k != "epoch"}, "epoch_val_"),
                     step=epoch, run_id=run_id)
        self.end(run_id)

    def log_files(self, folder: Path, names: tuple[str, ...], run_id: str | None = None) -> None:
        for name in names:
            path = Path(folder) / name
            if path.is_file():
                self.client.log_artifact(run_id or self.run_id, str(path))


@contextlib.contextmanager
def tracked_run(uri: str | None, name: str, tags: dict | None = None):
    """A top-level MLflow run named ``name`` in the ``featcache`` experiment, or None without ``uri``.

    The run ends FINISHED, or FAILED when the block raises (the exception goes on).

    Raises:
        FeatcacheError: MLflow is not installed, or the tracking URI cannot be used.
    """
    if not uri:
        yield None
        return
    client = _client(uri)
    try:
        experiment_id = _experiment_id(client, EXPERIMENT)
        run_id = client.create_run(experiment_id, run_name=name, tags=tags or {}).info.run_id
    except Exception as exc:  # noqa: BLE001 - a bad scheme, an unreachable server, a refused store
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise FeatcacheError(f"Cannot log to MLflow at {uri} ({type(exc).__name__}: {first}). "
                             f"Received: mlflow={uri!r}") from exc
    tracker = Tracker(client, experiment_id, run_id)
    try:
        yield tracker
    except BaseException:
        tracker.end(run_id, "FAILED")
        raise
    tracker.end(run_id)


def log_train_summary(tracker: Tracker | None, summary) -> None:
    """The chosen head of ``train-head`` on its backbone run: trial, parameters, threshold, validation metrics,
    the probe's, the calibration; head.json and the trials table as artifacts."""
    if tracker is None:
        return
    calibration = summary.calibration or {}
    params = {"backbone": summary.backbone, "cache_file": summary.cache_path.name, "best_trial": summary.best["number"],
              "threshold_method": summary.threshold_method, "calibrate": calibration.get("method", "none"),
              **{f"head_{k}": v for k, v in summary.best["params"].items()}}
    metrics = {**_finite_metrics(summary.val_metrics, "val_"), "threshold": summary.threshold,
               "trials": len(summary.rows), "new_trials": summary.new_trials, "seconds": summary.seconds,
               **_finite_metrics(summary.probe.val_scores, "probe_val_")}
    if calibration.get("method") == "temperature":
        metrics["temperature"] = calibration["temperature"]
    for when in ("before", "after"):
        metrics.update(_finite_metrics(calibration.get(f"validation_{when}", {}), f"calibration_{when}_"))
    tracker.log(params=params, metrics=metrics)
    tracker.log_files(summary.run_dir, ("head.json", "trials.csv"))


def log_evaluation(uri: str | None, reports: list[dict], selection: dict, runs_dir: Path) -> None:
    """One ``evaluate`` run: the comparison page and selection as artifacts, and a nested run per backbone with
    its test metrics (at the threshold and at 0.5), calibration and parity, and its report files."""
    with tracked_run(uri, "evaluate", {"selected_backbone": selection["backbone"]}) as tracker:
        if tracker is None:
            return
        tracker.log(params={"selected_backbone": selection["backbone"], "criterion": selection["criterion"]})
        tracker.log_files(runs_dir, COMPARISON_FILES)
        for report in reports:
            run_id = tracker.child(f"evaluate {report['backbone']}")
            metrics = {"val_roc_auc": report["validation"]["roc_auc"],
                       "parity_max_abs_diff": report["parity"]["max_abs_diff"], "test_images": report["test"]["images"]}
            for key, prefix in (("at_threshold", "test_"), ("at_0.5", "test_at_0.5_")):
                metrics.update(_finite_metrics({k: v["value"] for k, v in report[key]["metrics"].items()}, prefix))
            for key, prefix in (("calibration", "test_"), ("calibrated", "test_calibrated_")):
                if report.get(key):
                    metrics.update(_finite_metrics({k: v["value"] for k, v in report[key]["metrics"].items()}, prefix))
            tracker.log(params={"backbone": report["backbone"], "cache_file": report["cache_file"],
                                "threshold": report["at_threshold"].get("threshold", "per label")},  # multi-label
                        metrics=metrics, run_id=run_id)
            tracker.log_files(Path(report["run_dir"]), REPORT_FILES, run_id=run_id)
            tracker.end(run_id)
