"""``featcache export``: model.keras loads with plain Keras in a process without featcache, the SavedModel
scores raw image bytes, the model card, and refusals that leave nothing half-written."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from pipeline import copy_run, dev_pipeline, run_cli

from featcache.decode import load_image
from featcache.errors import FeatcacheError

N = 10


@pytest.fixture(scope="module")
def run(tmp_path_factory, dev_data):
    return dev_pipeline(tmp_path_factory, dev_data)


@pytest.fixture(scope="module")
def evaluated(run):
    """The first N test images of the report and the end-to-end probabilities ``evaluate`` recorded."""
    report = json.loads((run["run_dir"] / "report.json").read_text())
    return report["predictions"]["path"][:N], np.array(report["predictions"]["probability"][:N])


def _python(tmp_path, script: str, *args) -> dict:
    """Run ``script`` in a fresh interpreter, outside the repository, and parse its last stdout line as JSON."""
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, check=False, env={"TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
                                                         "PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


PLAIN_KERAS = """
import json, sys
import keras, numpy as np
model = keras.saving.load_model(sys.argv[1])  # safe_mode=True is the default; no custom_objects
probs = model.predict(np.load(sys.argv[2]), verbose=0)[:, 0]
print(json.dumps({"probs": probs.tolist(), "featcache": sorted(m for m in sys.modules if m.startswith("featcache")),
                  "dtype": str(model.input.dtype)}))
"""


def test_model_keras_loads_with_plain_keras_without_featcache(run, evaluated, tmp_path):
    paths, expected = evaluated
    np.save(tmp_path / "images.npy", np.stack([load_image(run["data"] / p, 64) for p in paths]))
    out = _python(tmp_path, PLAIN_KERAS, run["model"] / "model.keras", tmp_path / "images.npy")
    assert out["featcache"] == [] and out["dtype"] == "uint8"
    np.testing.assert_allclose(out["probs"], expected, atol=1e-5)


SAVED_MODEL = """
import json, sys
import tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
files = sys.argv[2:]
jpegs = [open(f, "rb").read() for f in files]
gray = tf.io.decode_jpeg(jpegs[0], channels=1, dct_method="INTEGER_ACCURATE")  # the same pixels, re-encoded losslessly
extra = [tf.io.encode_png(gray).numpy(), tf.io.encode_png(tf.image.grayscale_to_rgb(gray)).numpy()]
out = serve(image_bytes=tf.constant(jpegs + extra))
print(json.dumps({"probability": out["probability"].numpy().tolist(),
                  "label": [b.decode() for b in out["label"].numpy()],
                  "inputs": {k: v.dtype.name for k, v in serve.structured_input_signature[1].items()},
                  "featcache": sorted(m for m in sys.modules if m.startswith("featcache"))}))
"""


def test_saved_model_scores_encoded_bytes(run, evaluated, tmp_path):
    paths, expected = evaluated
    card = json.loads((run["model"] / "model.json").read_text())
    out = _python(tmp_path, SAVED_MODEL, run["model"] / "model.export", *[run["data"] / p for p in paths])
    assert out["featcache"] == [] and out["inputs"] == {"image_bytes": "string"}
    probs = np.array(out["probability"])
    np.testing.assert_allclose(probs[:N], expected, atol=1e-5)
    np.testing.assert_allclose(probs[N:], probs[0], atol=1e-6)  # gray or RGB PNG of the same pixels: same answer
    names = card["class_names"]
    assert out["label"] == [names[int(p >= card["threshold"])] for p in probs]


def test_model_card(run):
    card = json.loads((run["model"] / "model.json").read_text())
    head = json.loads((run["run_dir"] / "head.json").read_text())
    report = json.loads((run["run_dir"] / "report.json").read_text())
    assert card["backbone"] == "tiny" and card["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert card["weights"]["sha256"] == report["weights"]["sha256"] and card["weights"]["source"] == "random"
    assert card["cache_fingerprint"] == head["cache_fingerprint"] == report["cache_fingerprint"]
    assert card["head"]["params"] == head["params"] and card["threshold"] == head["threshold"]
    assert card["validation_metrics"] == head["val_metrics"]
    assert card["test_metrics"]["at_threshold"]["accuracy"] == report["at_threshold"]["metrics"]["accuracy"]["value"]
    assert set(card["versions"]) == {"featcache", "tensorflow", "keras"}
    assert card["verification"]["max_abs_diff_model_keras"] <= 1e-5
    assert card["verification"]["max_abs_diff_saved_model"] <= 1e-5
    assert card["files"]["keras_sha256"] == hashlib.sha256((run["model"] / "model.keras").read_bytes()).hexdigest()
    assert sorted(p.name for p in run["model"].iterdir()) == ["MODEL_CARD.md", "model.export", "model.json",
                                                              "model.keras"]


def test_model_card_markdown_says_what_model_json_says(run, tmp_path):
    import h5py
    import shlex

    from featcache.cardtext import render_model_card
    from featcache.cache import read_manifest

    card = json.loads((run["model"] / "model.json").read_text())
    report = json.loads((run["run_dir"] / "report.json").read_text())
    manifest = read_manifest(run["cache"])
    data = card["training_data"]
    with h5py.File(run["cache"], "r") as handle:  # counted here from the file table, independently
        labels, splits = handle["files/label"][...], handle["files/split"][...]
        patients = handle["files/patient"].asstr()[...]
    for code, split in enumerate(("train", "val", "test")):
        assert sum(data["images"][split].values()) == manifest["counts"][split] > 0
        assert data["patients"][split] == len(set(patients[splits == code])) > 0
        assert data["images"][split]["PNEUMONIA"] == int(((splits == code) & (labels == 1)).sum())
    assert data["images"]["test"]["PNEUMONIA"] == report["test"]["positives"]
    assert data["augmented_copies"] == manifest["counts"]["train_copies"]
    assert card["calibration"] == report["calibration"]["metrics"]
    text = (run["model"] / "MODEL_CARD.md").read_text()
    assert text == render_model_card(card)
    train = data["images"]["train"]
    for expected in ("random (seeded) weights", "Not a medical device", "## Known limitations", "Brier score",
                     f"| train | {train['NORMAL']} | {train['PNEUMONIA']} | {data['patients']['train']} |",
                     card["cache_fingerprint"], data["command"]):
        assert expected in text, expected
    # The card's extract command rebuilds this very cache: run in a copy of the cache folder, it finds every
    # row already there (same fingerprint) and computes none.
    copy = copy_run(run, tmp_path)
    result = run_cli(*shlex.split(data["command"])[1:], "--cache-dir", str(copy["cache_dir"]), "--no-progress")
    assert result.exit_code == 0, result.output
    assert copy["cache"].name in result.output and "computed 0 rows" in result.output


def _one_line_error(result, message):
    assert result.exit_code == 1, result.output
    assert message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_existing_folder_needs_force(run, tmp_path):
    copy = copy_run(run, tmp_path)
    before = (copy["model"] / "model.json").read_text()
    _one_line_error(run_cli("export", "--cache-dir", copy["cache_dir"], "--out", copy["model"]), "pass --force")
    assert (copy["model"] / "model.json").read_text() == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    _one_line_error(run_cli("export", "--cache-dir", copy["cache_dir"], "--out", tmp_path / "mine", "--force"),
                    "not a featcache export")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"
    result = run_cli("export", "--cache-dir", copy["cache_dir"], "--out", copy["model"], "--force", "--backbone", "tiny")
    assert result.exit_code == 0, result.output
    assert json.loads((copy["model"] / "model.json").read_text())["created"] >= json.loads(before)["created"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "mine", "model"]  # no temporary folders left


def test_failed_export_leaves_nothing(run, tmp_path, monkeypatch):
    import featcache.export

    def broken(*args, **kwargs):
        raise FeatcacheError("verification failed (simulated)")

    monkeypatch.setattr(featcache.export, "verify_export", broken)
    copy = copy_run(run, tmp_path)
    _one_line_error(run_cli("export", "--cache-dir", copy["cache_dir"], "--out", tmp_path / "new"), "simulated")
    before = (copy["model"] / "model.keras").read_bytes()
    _one_line_error(run_cli("export", "--cache-dir", copy["cache_dir"], "--out", copy["model"], "--force"), "simulated")
    assert (copy["model"] / "model.keras").read_bytes() == before  # the earlier export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "model"]


def test_export_needs_an_evaluation_of_this_very_head(run, tmp_path):
    from featcache.head import HeadParams, build_head

    copy = copy_run(run, tmp_path)
    out = tmp_path / "out"
    # the head is trained again after evaluate: the report (and the selection) no longer describe it
    build_head((2, 2, 16), HeadParams(units=8)).maps.save(copy["run_dir"] / "head.keras")
    record = json.loads((copy["run_dir"] / "head.json").read_text())
    record["head_sha256"] = hashlib.sha256((copy["run_dir"] / "head.keras").read_bytes()).hexdigest()
    (copy["run_dir"] / "head.json").write_text(json.dumps(record))
    _one_line_error(run_cli("export", "--cache-dir", copy["cache_dir"], "--out", out), "re-run 'featcache evaluate'")
    (copy["run_dir"] / "report.json").unlink()
    _one_line_error(run_cli("export", "--cache-dir", copy["cache_dir"], "--out", out, "--backbone", "tiny"),
                    "has not been evaluated")
    (copy["cache_dir"] / "runs" / "selection.json").unlink()
    _one_line_error(run_cli("export", "--cache-dir", copy["cache_dir"], "--out", out), "run 'featcache evaluate' first")
    assert not out.exists()


def test_export_without_the_data_folder_checks_synthetic_images(run, tmp_path):
    copy = copy_run(run, tmp_path)
    report = json.loads((copy["run_dir"] / "report.json").read_text())
    report["data_dir"] = str(tmp_path / "moved-away")
    (copy["run_dir"] / "report.json").write_text(json.dumps(report))
    leftover = tmp_path / ".m2.incomplete-999999999"  # left by an export that was killed (no such process now)
    (leftover / "model.export").mkdir(parents=True)
    result = run_cli("export", "--cache-dir", copy["cache_dir"], "--out", tmp_path / "m2")
    assert result.exit_code == 0, result.output
    assert not leftover.exists()
    card = json.loads((tmp_path / "m2" / "model.json").read_text())
    assert card["verification"]["images"] == ["synthetic-gray.png", "synthetic-colour.jpeg"]
    assert card["verification"]["max_abs_diff_saved_model"] <= 1e-5



# --- --force replaces only a provable earlier export (bug 5) ---------------------------------------


def _tree(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def _project_with_a_model_json(folder):
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "main.py").write_text("print('my project')\n")
    (folder / "model.json").write_text('{"layers": 3}\n')
    return _tree(folder)


def _not_an_export(kind, folder, export):
    """Folders that hold a model.json but are not (or no longer) an untouched featcache export."""
    if kind == "project":  # the reported bug: a user's project that merely holds a model.json
        return _project_with_a_model_json(folder)
    if kind == "card alone":
        folder.mkdir()
        shutil.copyfile(export / "model.json", folder / "model.json")
        return _tree(folder)
    shutil.copytree(export, folder)
    if kind == "export plus a file":
        (folder / "notes.txt").write_text("mine")
    elif kind == "swapped model.keras":
        (folder / "model.keras").write_bytes(b"other")
    elif kind == "file in the SavedModel":
        (folder / "model.export" / "extra.py").write_text("x")
    elif kind == "card of another kind":
        _edit_json(folder / "model.json", backbone=7)
    return _tree(folder)


@pytest.mark.parametrize("kind", ["project", "card alone", "export plus a file", "swapped model.keras",
                                  "file in the SavedModel", "card of another kind"])
def test_force_refuses_anything_but_an_earlier_export(run, tmp_path, kind):
    out = tmp_path / "out"
    before = _not_an_export(kind, out, run["model"])
    result = run_cli("export", "--cache-dir", run["cache_dir"], "--out", out, "--force")
    _one_line_error(result, "nothing was deleted")
    assert _tree(out) == before  # not one file removed or renamed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or renamed folders


def _edit_json(path, **changes):
    card = json.loads(path.read_text())
    card.update(changes)
    path.write_text(json.dumps(card))


def test_force_through_a_symlink_replaces_the_target_and_keeps_the_link(run, tmp_path):
    copy = copy_run(run, tmp_path)
    target = tmp_path / "models" / "v1"
    target.parent.mkdir()
    shutil.move(copy["model"], target)
    link = tmp_path / "current"
    link.symlink_to(target, target_is_directory=True)
    before = json.loads((target / "model.json").read_text())["created"]
    result = run_cli("export", "--cache-dir", copy["cache_dir"], "--out", link, "--force", "--backbone", "tiny")
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert json.loads((target / "model.json").read_text())["created"] >= before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "current", "models"]  # no stray renamed link
    assert sorted(p.name for p in target.parent.iterdir()) == ["v1"]  # no temporary or old folders


def test_symlinks_to_foreign_folders_or_nowhere_are_refused(run, tmp_path):
    project = tmp_path / "project"
    before = _project_with_a_model_json(project)
    link = tmp_path / "link"
    link.symlink_to(project, target_is_directory=True)
    _one_line_error(run_cli("export", "--cache-dir", run["cache_dir"], "--out", link, "--force"),
                    "nothing was deleted")
    assert _tree(project) == before and link.is_symlink()
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    _one_line_error(run_cli("export", "--cache-dir", run["cache_dir"], "--out", dangling, "--force"),
                    "symbolic link that leads nowhere")
    assert dangling.is_symlink() and not (tmp_path / "gone").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "link", "project"]


def test_card_is_sealed_and_the_saved_model_carries_the_threshold(run):
    import tensorflow as tf

    from featcache.integrity import canonical_sha256

    card = json.loads((run["model"] / "model.json").read_text())
    assert card["card_sha256"] == canonical_sha256(card, "card_sha256")
    saved = tf.saved_model.load(str(run["model"] / "model.export")).signatures["threshold"]
    assert float(saved()["threshold"].numpy()) == card["threshold"]


def test_an_unsealed_export_of_an_earlier_version_is_replaceable_but_not_trusted(run, tmp_path):
    from featcache.modelcard import check_export_folder, read_card

    old = tmp_path / "old"
    shutil.copytree(run["model"], old)
    card = json.loads((old / "model.json").read_text())
    del card["card_sha256"]
    (old / "model.json").write_text(json.dumps(card))
    assert check_export_folder(old, "fix")["backbone"] == "tiny"  # --force may replace it
    with pytest.raises(FeatcacheError, match="'card_sha256' is missing"):
        read_card(old, "fix")  # predict and verify do not trust it


def test_a_standardized_head_exports_as_plain_keras_and_keeps_parity(run, tmp_path):
    """A head with a Normalization layer (trial 1 of the study, the standardized reference) goes through
    evaluate (parity) and export, and model.keras loads in safe mode in a process without featcache."""
    from featcache.head import choose_threshold, score_probs
    from featcache.runs import load_head_record, write_head
    from featcache.tune import _refit, load_head_data

    mine = copy_run(run, tmp_path)
    record = load_head_record(mine["run_dir"])
    rows = [json.loads(line) for line in (mine["run_dir"] / "trials.jsonl").read_text().splitlines()]
    trial = next(r for r in rows if r["number"] == 1)
    assert trial["params"]["standardize"] is True
    data = load_head_data(mine["cache"])
    models, probs = _refit(trial, data, data.train)
    threshold, method = choose_threshold(data.val_labels, probs)
    write_head(mine["run_dir"], models.maps, mine["cache"], data.manifest, trial, threshold, method,
               score_probs(data.val_labels, probs, threshold), record["study_name"], probe=record["probe"])
    result = run_cli("evaluate", "--cache-dir", mine["cache_dir"], "--bootstrap", "50")
    assert result.exit_code == 0, result.output
    report = json.loads((mine["run_dir"] / "report.json").read_text())
    assert report["head"]["params"]["standardize"] is True and report["parity"]["max_abs_diff"] <= 1e-3
    out = tmp_path / "standardized-model"
    result = run_cli("export", "--cache-dir", mine["cache_dir"], "--out", out)
    assert result.exit_code == 0, result.output
    paths = report["predictions"]["path"][:N]
    np.save(tmp_path / "images.npy", np.stack([load_image(run["data"] / p, 64) for p in paths]))
    script = PLAIN_KERAS.replace('"dtype": str(model.input.dtype)', '"layers": [l.__class__.__name__ for l in '
                                 'model.get_layer("head").layers]')
    loaded = _python(tmp_path, script, out / "model.keras", tmp_path / "images.npy")
    assert loaded["featcache"] == [] and "Normalization" in loaded["layers"]
    np.testing.assert_allclose(loaded["probs"], report["predictions"]["probability"][:N], atol=1e-5)
