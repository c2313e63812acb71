"""train-head --calibrate through evaluate, export and predict on the dev X-rays (tiny backbone): the temperature
lives in the exported model, which stays plain Keras in safe mode; the isotonic lookup is recorded and applied
in the reports, and the exported model says it outputs the uncalibrated score."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from pipeline import copy_run, dev_pipeline, run_cli

from featcache.decode import load_image
from featcache.posthoc import apply_isotonic

N = 12


@pytest.fixture(scope="module")
def run(tmp_path_factory, dev_data):
    return dev_pipeline(tmp_path_factory, dev_data)


def _calibrated_run(run, target, method):
    copy = copy_run(run, target)
    for args in (["train-head", "--cache-dir", copy["cache_dir"], "--trials", "2", "--no-progress", "--calibrate", method],
                 ["evaluate", "--no-progress", "--cache-dir", copy["cache_dir"], "--bootstrap", "100"],
                 ["export", "--cache-dir", copy["cache_dir"], "--out", copy["model"], "--force"]):
        result = run_cli(*args)
        assert result.exit_code == 0, f"{args[0]}: {result.output} {result.exception!r}"
        copy[args[0]] = result.output
    return copy


def _logit(p):
    p = np.asarray(p, np.float64)
    return np.log(p) - np.log1p(-p)


PLAIN_KERAS = """
import json, sys
import keras, numpy as np
model = keras.saving.load_model(sys.argv[1], safe_mode=True)
print(json.dumps({"probs": model.predict(np.load(sys.argv[2]), verbose=0)[:, 0].tolist(),
                  "featcache": sorted(m for m in sys.modules if m.startswith("featcache"))}))
"""


def test_temperature_is_in_the_exported_model_which_loads_in_safe_mode(run, tmp_path):
    before = json.loads((run["run_dir"] / "report.json").read_text())
    copy = _calibrated_run(run, tmp_path, "temperature")
    head = json.loads((copy["run_dir"] / "head.json").read_text())
    record = head["calibration"]
    temperature = record["temperature"]
    assert record["method"] == "temperature" and temperature > 0 and "temperature T =" in copy["train-head"]
    assert record["validation_after"]["log_loss"] <= record["validation_before"]["log_loss"] + 1e-9
    report = json.loads((copy["run_dir"] / "report.json").read_text())
    assert report["post_hoc_calibration"]["temperature"] == temperature and "calibrated" not in report
    # the same trial and ranking; each test probability is sigmoid(logit / T) of the uncalibrated one
    assert report["head"]["trial_number"] == before["head"]["trial_number"]
    raw, scaled = np.array(before["predictions"]["probability"]), np.array(report["predictions"]["probability"])
    inside = (raw > 0.01) & (raw < 0.99) & (scaled > 0.01) & (scaled < 0.99)
    assert inside.sum() >= 5
    np.testing.assert_allclose(_logit(scaled[inside]) * temperature, _logit(raw[inside]), atol=2e-3)
    assert "Post-hoc calibration" in (copy["run_dir"] / "report.md").read_text()
    assert "Post-hoc calibration" in (copy["run_dir"] / "report.html").read_text()
    card = json.loads((copy["model"] / "model.json").read_text())
    assert card["post_hoc_calibration"]["temperature"] == temperature
    text = (copy["model"] / "MODEL_CARD.md").read_text()
    assert "temperature T =" in text and "--calibrate temperature" in text
    # plain Keras, safe mode, a fresh interpreter without featcache: the evaluated (calibrated) probabilities
    paths = report["predictions"]["path"][:N]
    np.save(tmp_path / "images.npy", np.stack([load_image(run["data"] / p, 64) for p in paths]))
    done = subprocess.run([sys.executable, "-c", PLAIN_KERAS, str(copy["model"] / "model.keras"),
                           str(tmp_path / "images.npy")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          check=False, env={"TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
                                            "PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["featcache"] == []
    np.testing.assert_allclose(out["probs"], scaled[:N], atol=1e-5)


def test_isotonic_lookup_is_recorded_and_applied_in_the_reports(run, tmp_path):
    before = json.loads((run["run_dir"] / "report.json").read_text())
    copy = _calibrated_run(run, tmp_path, "isotonic")
    head = json.loads((copy["run_dir"] / "head.json").read_text())
    table = head["calibration"]["table"]
    assert np.all(np.diff(table["x"]) > 0) and np.all(np.diff(table["y"]) >= 0)
    assert head["threshold"] == pytest.approx(before["head"]["threshold"])  # the threshold stays on the score
    report = json.loads((copy["run_dir"] / "report.json").read_text())
    probs = np.array(report["predictions"]["probability"])
    np.testing.assert_allclose(probs, before["predictions"]["probability"])  # the model itself is unchanged
    np.testing.assert_allclose(report["predictions"]["calibrated_probability"], apply_isotonic(table, probs))
    assert set(report["calibrated"]["metrics"]) == {"brier", "ece"}
    assert (copy["run_dir"] / "calibration-calibrated.png").stat().st_size > 0
    card = json.loads((copy["model"] / "model.json").read_text())
    assert card["post_hoc_calibration"]["table"] == table
    assert "UNCALIBRATED" in card["files"]["outputs"]["probability"]
    text = (copy["model"] / "MODEL_CARD.md").read_text()
    assert "output the uncalibrated score" in text and "| score | calibrated probability |" in text
    files = [run["data"] / p for p in report["predictions"]["path"][:3]]
    result = run_cli("predict", *files, "--model", copy["model"], "--json", "--no-progress")
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.output)["predictions"]
    np.testing.assert_allclose([p["calibrated_probability"] for p in predictions],
                               apply_isotonic(table, [p["probability"] for p in predictions]))
