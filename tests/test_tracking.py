"""Optional MLflow tracking (--mlflow / FEATCACHE_MLFLOW_URI): nothing without it, not even the import; with a local
file store, a run per backbone with a nested run per trial and per-epoch validation metrics, and evaluate's
reports as artifacts."""

import json
import os
import subprocess
import sys

import pytest
from pipeline import copy_run, dev_pipeline

from featcache.config import TrainHeadConfig
from featcache.errors import FeatcacheError
from featcache.tracking import tracked_run
from featcache.tune import train_heads


def _mlflow():
    try:
        import mlflow  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("MLflow is not installed; CI installs featcache[mlflow]")
        pytest.skip("MLflow is not installed (pip install 'featcache[mlflow]')")
    from mlflow.tracking import MlflowClient

    return MlflowClient


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    return (tmp_path / "mlruns").as_uri()


def test_without_a_uri_nothing_is_logged_and_mlflow_is_not_imported(tmp_path):
    with tracked_run(None, "x") as tracker:
        assert tracker is None
    script = ("import sys, featcache.cli, featcache.tune, featcache.evaluate, featcache.tracking\n"
              "print('mlflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_a_missing_mlflow_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(FeatcacheError, match=r"pip install 'featcache\[mlflow\]'"):
        with tracked_run("file:///nowhere", "x"):
            pass


def test_train_head_logs_each_trial_and_its_epochs(synthetic_cache, tmp_path, store):
    client_class = _mlflow()
    path = synthetic_cache()
    summary = train_heads(TrainHeadConfig(cache_dir=tmp_path / "cache", trials=3, max_epochs=6, patience=3,
                                          progress=False, mlflow=store, calibrate="temperature"))[0]
    client = client_class(tracking_uri=store)
    experiment = client.get_experiment_by_name("featcache")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_name for r in parents] == [f"train-head {path.stem}"]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["best_trial"] == str(summary.best["number"])
    assert parent.data.params["calibrate"] == "temperature"
    assert parent.data.metrics["val_roc_auc"] == pytest.approx(summary.val_metrics["roc_auc"])
    assert parent.data.metrics["temperature"] == pytest.approx(summary.calibration["temperature"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"head.json", "trials.csv"} <= artifacts
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: int(r.data.params["trial"]))
    assert [int(r.data.params["trial"]) for r in children] == [row["number"] for row in summary.rows]
    for child, row in zip(children, summary.rows):
        assert child.data.params["units"] == str(row["params"]["units"])
        history = client.get_metric_history(child.info.run_id, "epoch_val_roc_auc")
        assert len(history) == row["epochs"]  # one point per epoch the trial ran
        assert child.data.metrics["val_roc_auc"] == pytest.approx(row["val_roc_auc"])


def test_evaluate_logs_metrics_and_reports_from_the_environment_variable(tmp_path_factory, dev_data, tmp_path, store):
    client_class = _mlflow()
    copy = copy_run(dev_pipeline(tmp_path_factory, dev_data), tmp_path)
    from featcache.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["evaluate", "--no-progress", "--cache-dir", str(copy["cache_dir"]),
                                      "--bootstrap", "50"], env={"FEATCACHE_MLFLOW_URI": store})
    assert result.exit_code == 0, f"{result.output} {result.exception!r}"
    report = json.loads((copy["run_dir"] / "report.json").read_text())
    client = client_class(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("featcache").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "evaluate")
    assert parent.data.params["selected_backbone"] == "tiny"
    assert {"report.html", "selection.json", "comparison.md"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    child = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert child.data.metrics["test_roc_auc"] == pytest.approx(report["at_threshold"]["metrics"]["roc_auc"]["value"])
    assert child.data.metrics["test_brier"] == pytest.approx(report["calibration"]["metrics"]["brier"]["value"])
    assert {"report.html", "report.json", "roc.png", "pr.png"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
