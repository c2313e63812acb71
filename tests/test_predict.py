"""``featcache predict``: labels and probabilities from an export, skipped files and exit codes."""

import json
import shutil

import numpy as np
import pytest
from pipeline import dev_pipeline, run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory, dev_data):
    return dev_pipeline(tmp_path_factory, dev_data)


@pytest.fixture
def images(run, tmp_path):
    """Six test X-rays in a folder (two in a subfolder), and what ``evaluate`` scored them."""
    report = json.loads((run["run_dir"] / "report.json").read_text())
    chosen = report["predictions"]["path"][::25]
    folder = tmp_path / "in"
    for i, path in enumerate(chosen):
        target = folder / ("sub" if i % 3 == 0 else "") / path.replace("/", "_")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run["data"] / path, target)
    expected = dict(zip(report["predictions"]["path"], report["predictions"]["probability"]))
    return folder, {path.replace("/", "_"): expected[path] for path in chosen}


def test_predict_lines_match_the_evaluated_probabilities(run, images):
    folder, expected = images
    card = json.loads((run["model"] / "model.json").read_text())
    result = run_cli("predict", folder, "--model", run["model"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(expected) == 6
    for line in lines:
        label, prob, path = line.split(maxsplit=2)
        name = path.rsplit("/", 1)[-1]
        assert float(prob) == pytest.approx(expected[name], abs=1e-4)
        assert label == card["class_names"][int(float(prob) >= card["threshold"])]


def test_json_output_and_skipped_files(run, images, bad_inputs, tmp_path):
    folder, expected = images
    for bad in ("notes.jpeg", "truncated.jpeg", "x.jpeg"):
        shutil.copyfile(bad_inputs / bad, folder / bad)
    missing = tmp_path / "nowhere.png"
    result = run_cli("predict", folder, missing, "--model", run["model"], "--json")
    assert result.exit_code == 2, result.output  # 2: some inputs were skipped, the others predicted
    out = json.loads(result.stdout)
    assert out["backbone"] == "tiny" and out["positive_class"] == "PNEUMONIA"
    got = {p["path"].rsplit("/", 1)[-1]: p["probability"] for p in out["predictions"]}
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), atol=1e-5)
    skipped = {s["path"].rsplit("/", 1)[-1]: s["error"] for s in out["skipped"]}
    assert set(skipped) == {"notes.jpeg", "truncated.jpeg", "x.jpeg", "nowhere.png"}
    assert skipped["nowhere.png"] == "does not exist" and "empty" in skipped["x.jpeg"]
    plain = run_cli("predict", folder, "--model", run["model"])
    assert plain.exit_code == 2 and "skipped" in plain.stderr and "notes.jpeg" in plain.stderr
    assert len(plain.stdout.strip().splitlines()) == 6


def test_nothing_readable_is_an_error(run, bad_inputs):
    result = run_cli("predict", bad_inputs / "notes.jpeg", bad_inputs / "x.jpeg", "--model", run["model"])
    assert result.exit_code == 1 and "No readable image" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_not_an_export(tmp_path, bad_inputs):
    result = run_cli("predict", bad_inputs / "notes.jpeg", "--model", tmp_path)
    assert result.exit_code == 1 and "is not a featcache export" in result.output
