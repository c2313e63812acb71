"""``featcache predict``: labels and probabilities from an export, skipped files and exit codes."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

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
    result = run_cli("predict", "--no-progress", folder, "--model", run["model"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(expected) == 6
    for line in lines:
        label, prob, path = line.split(maxsplit=2)
        name = path.rsplit("/", 1)[-1]
        assert float(prob) == pytest.approx(expected[name], abs=1e-4)
        assert label == card["class_names"][int(float(prob) >= card["threshold"])]


def test_batches_of_any_size_give_the_same_predictions_and_a_bar_counts_the_files(run, images, bad_inputs,
                                                                                  monkeypatch):
    import featcache.predict as predict

    folder, expected = images
    seen = []
    real = predict.predict_padded
    monkeypatch.setattr(predict, "predict_padded", lambda model, x, width: seen.append((len(x), width)) or real(model, x, width))
    results = {size: run_cli("predict", folder, bad_inputs / "notes.jpeg", "--model", run["model"], "--json",
                             "--batch-size", size, "--progress" if size == 4 else "--no-progress")
               for size in (1, 4, 32)}
    assert all(n <= width for n, width in seen)  # never more than a batch of images at once
    assert {width for _, width in seen} == {1, 4, 7}  # one input shape per run (7 inputs: a batch of 32 is 7 wide)
    outs = {size: json.loads(result.stdout) for size, result in results.items()}
    for out in outs.values():
        assert [p["path"] for p in out["predictions"]] == [p["path"] for p in outs[1]["predictions"]]
        assert [p["label"] for p in out["predictions"]] == [p["label"] for p in outs[1]["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in out["predictions"]],
                                   [p["probability"] for p in outs[1]["predictions"]], rtol=0, atol=1e-6)
        assert [s["path"].rsplit("/", 1)[-1] for s in out["skipped"]] == ["notes.jpeg"]
    assert "predict" in results[4].stderr and "7/7" in results[4].stderr
    assert "7/7" not in results[1].stderr
    assert run_cli("predict", folder, "--model", run["model"], "--batch-size", 0).exit_code == 1


def test_json_output_and_skipped_files(run, images, bad_inputs, tmp_path):
    folder, expected = images
    for bad in ("notes.jpeg", "truncated.jpeg", "x.jpeg"):
        shutil.copyfile(bad_inputs / bad, folder / bad)
    missing = tmp_path / "nowhere.png"
    result = run_cli("predict", "--no-progress", folder, missing, "--model", run["model"], "--json")
    assert result.exit_code == 2, result.output  # 2: some inputs were skipped, the others predicted
    out = json.loads(result.stdout)
    assert out["backbone"] == "tiny" and out["positive_class"] == "PNEUMONIA"
    got = {p["path"].rsplit("/", 1)[-1]: p["probability"] for p in out["predictions"]}
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), atol=1e-5)
    skipped = {s["path"].rsplit("/", 1)[-1]: s["error"] for s in out["skipped"]}
    assert set(skipped) == {"notes.jpeg", "truncated.jpeg", "x.jpeg", "nowhere.png"}
    assert skipped["nowhere.png"] == "does not exist" and "empty" in skipped["x.jpeg"]
    plain = run_cli("predict", "--no-progress", folder, "--model", run["model"])
    assert plain.exit_code == 2 and "skipped" in plain.stderr and "notes.jpeg" in plain.stderr
    assert len(plain.stdout.strip().splitlines()) == 6


def test_nothing_readable_is_an_error(run, bad_inputs):
    result = run_cli("predict", "--no-progress", bad_inputs / "notes.jpeg", bad_inputs / "x.jpeg", "--model", run["model"])
    assert result.exit_code == 1 and "No readable image" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_not_an_export(tmp_path, bad_inputs):
    result = run_cli("predict", "--no-progress", bad_inputs / "notes.jpeg", "--model", tmp_path)
    assert result.exit_code == 1 and "is not a featcache export" in result.output


# --- hostile inputs: only regular files are opened, and only up to --max-file-mb ---------------------


def test_fifos_devices_links_and_large_files_are_skipped_promptly(run, images, tmp_path):
    folder, expected = images
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    os.mkfifo(hostile / "fifo.jpeg")  # opening it for reading would block forever
    (hostile / "loop.jpeg").symlink_to(hostile / "loop.jpeg")
    (hostile / "dangling.png").symlink_to(hostile / "gone.png")
    (hostile / "zero.jpeg").symlink_to("/dev/zero")  # reading it would never end
    fifo_arg = tmp_path / "fifo-arg.jpeg"
    os.mkfifo(fifo_arg)
    command = [sys.executable, "-m", "featcache", "predict", folder, hostile, fifo_arg, "/dev/zero",
               "--model", run["model"], "--json"]
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    out = json.loads(result.stdout)
    assert len(out["predictions"]) == len(expected)  # the regular images are all predicted
    skipped = {s["path"].rsplit("/", 1)[-1]: s["error"] for s in out["skipped"]}
    assert "FIFO" in skipped["fifo.jpeg"] and "FIFO" in skipped["fifo-arg.jpeg"]
    assert "link loop" in skipped["loop.jpeg"] and "dangling" in skipped["dangling.png"]
    assert "character device" in skipped["zero.jpeg"] and "character device" in skipped["zero"]
    by_size = sorted(folder.rglob("*.jpeg"), key=lambda p: p.stat().st_size)
    small, large = by_size[0], by_size[-1]
    limit_mb = (large.stat().st_size - 1) / 2**20  # a regular file: in-process is safe here
    limited = run_cli("predict", "--no-progress", small, large, "--model", run["model"], "--max-file-mb", f"{limit_mb:.6f}", "--json")
    assert limited.exit_code == 2, limited.output
    out = json.loads(limited.stdout)
    assert [p["path"] for p in out["predictions"]] == [str(small)]
    assert out["skipped"][0]["path"] == str(large) and "--max-file-mb" in out["skipped"][0]["error"]


# --- a tampered export is refused before anything is predicted ---------------------------------------


def _reseal(path, **changes):
    from featcache.modelcard import seal_card

    card = json.loads(path.read_text())
    card.update(changes)
    path.write_text(json.dumps(seal_card({k: v for k, v in card.items() if k != "card_sha256"})))


def _one_line(result, message):
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.fixture
def export_copy(run, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(run["model"], copy)
    return copy


def test_edited_threshold_is_refused(run, images, export_copy):
    card = json.loads((export_copy / "model.json").read_text())
    card["threshold"] = 0.01
    (export_copy / "model.json").write_text(json.dumps(card, indent=1))
    _one_line(run_cli("predict", "--no-progress", images[0], "--model", export_copy), "was edited after export")


def test_swapped_model_keras_is_refused(run, images, export_copy, tmp_path):
    from featcache.head import HeadParams, build_head

    build_head((2, 2, 16), HeadParams(units=8)).maps.save(tmp_path / "other.keras")
    shutil.copyfile(tmp_path / "other.keras", export_copy / "model.keras")
    _one_line(run_cli("predict", "--no-progress", images[0], "--model", export_copy), "records")


def _lambda_model(path):
    import keras

    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs)).save(path)


@pytest.mark.parametrize("content, message", [
    (b"not a zip at all", "Keras cannot load"),
    (_lambda_model, "safe mode"),  # a Lambda layer: arbitrary code, refused by safe mode
])
def test_model_keras_that_safe_mode_refuses_is_one_line(run, images, export_copy, content, message):
    keras_path = export_copy / "model.keras"
    if callable(content):
        keras_path.unlink()
        content(keras_path)
    else:
        keras_path.write_bytes(content)
    files = {**json.loads((export_copy / "model.json").read_text())["files"],
             "keras_sha256": hashlib.sha256(keras_path.read_bytes()).hexdigest()}
    _reseal(export_copy / "model.json", files=files)  # the record matches: only loading can tell
    _one_line(run_cli("predict", "--no-progress", images[0], "--model", export_copy), message)


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ("[]", "holds a JSON list"),
    ('{"backbone": "tiny"}', "is missing"),
    (None, "'threshold' is str, expected int or float"),
])
def test_malformed_model_json_is_one_line(run, images, export_copy, text, message):
    path = export_copy / "model.json"
    if text is None:
        card = json.loads(path.read_text())
        card["threshold"] = "0.5"
        text = json.dumps(card)
    path.write_text(text)
    _one_line(run_cli("predict", "--no-progress", images[0], "--model", export_copy), message)
