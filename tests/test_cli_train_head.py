"""``featcache train-head`` through the CLI: summary table, one-line errors with exit code 1, and an
end-to-end run on a cache extracted from the real dev X-rays."""

import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from featcache.cli import app
from featcache.runs import check_head_matches_cache, load_head_record, run_dir_for

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_train_head_prints_the_best_trials(synthetic_cache):
    path = synthetic_cache()
    result = _run("train-head", "--cache-dir", path.parent, "--trials", 6, "--seed", 3, "--no-progress")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["trial", "val_auc"])
    table = lines[header + 1:]
    assert 1 <= len(table) <= 5
    aucs = [float(line.split()[1]) for line in table]
    assert aucs == sorted(aucs, reverse=True) and "tiny: 6 trials (6 new" in result.output
    assert (run_dir_for(path) / "head.keras").is_file()


def _make_incomplete(cache_dir):
    (cache_dir / "tiny-0123456789ab.partial").mkdir(parents=True)


def _make_other_format(cache_dir, synthetic_cache):
    with h5py.File(synthetic_cache(cache_dir=cache_dir), "r+") as handle:
        handle.attrs["format_version"] = 0


@pytest.mark.parametrize("case, args, message", [
    ("empty", [], "No cache in"),
    ("incomplete", [], "incomplete (an extract is running or was killed)"),
    ("incomplete", ["--backbone", "tiny"], "incomplete (an extract is running or was killed)"),
    ("other-format", [], "format version 0"),
    ("good", ["--trials", "0"], "--trials must be >= 1"),
    ("good", ["--storage", "nosuchscheme://db"], "Cannot open --storage"),
    ("good", ["--min-sensitivity", "0"], "--min-sensitivity must be in (0, 1]"),
    ("good", ["--backbone", "vgg16"], "No vgg16 cache"),
])
def test_train_head_errors_are_one_red_line_and_exit_1(synthetic_cache, tmp_path, case, args, message):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    if case == "incomplete":
        _make_incomplete(cache_dir)
    elif case == "other-format":
        _make_other_format(cache_dir, synthetic_cache)
    elif case == "good":
        synthetic_cache(cache_dir=cache_dir)
    result = _run("train-head", "--cache-dir", cache_dir, "--no-progress", *args)
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (cache_dir / "runs").exists()  # nothing written, nothing damaged


def test_end_to_end_on_extracted_dev_xrays(dev_data, tmp_path):
    import keras

    cache_dir = tmp_path / "cache"
    extracted = _run("extract", "--data", dev_data, "--backbone", "tiny", "--weights", "random", "--image-size", 64,
                     "--augment-copies", 2, "--cache-dir", cache_dir, "--no-progress")
    assert extracted.exit_code == 0, extracted.output
    trained = _run("train-head", "--cache-dir", cache_dir, "--trials", 3, "--no-progress")
    assert trained.exit_code == 0, trained.output
    (cache_path,) = [p for p in cache_dir.glob("tiny-*.h5") if not p.name.endswith(".weights.h5")]
    record = load_head_record(cache_path)
    manifest = check_head_matches_cache(record, cache_path)
    assert record["backbone"] == "tiny" and record["positive_class"] == manifest["class_names"][1] == "PNEUMONIA"
    rows = [json.loads(line) for line in (run_dir_for(cache_path) / "trials.jsonl").read_text().splitlines()]
    assert [row["number"] for row in rows] == [0, 1, 2]
    head = keras.saving.load_model(record["head_path"], safe_mode=True)
    with h5py.File(cache_path, "r") as handle:
        maps = handle["features"][:16]
    probs = head.predict(maps, verbose=0)
    assert probs.shape == (16, 1) and np.all((probs >= 0) & (probs <= 1))
    assert 0.5 <= record["val_metrics"]["roc_auc"] <= 1  # random tiny backbone: better than chance is enough
    # Continuing with more trials keeps the three and adds two.
    more = _run("train-head", "--cache", cache_path, "--trials", 5)  # with the progress bar
    assert more.exit_code == 0 and "5 trials (2 new" in more.output, more.output
    assert "2/2" in more.output and "best_val_auc=" in more.output
