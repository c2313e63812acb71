"""Multi-label end to end (issue 8 part 4): a CheXpert-like nested tree with a CSV of three 0/1 labels with
uncertain values -> extract (/targets, NaN masked) -> train-head -> evaluate -> export -> predict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from datasets import write_csv
from pipeline import run_cli

LABELS = ("Pneumonia", "Opacity", "Edema")
FAST = ["--backbone", "tiny", "--weights", "random", "--image-size", "32", "--augment-copies", "1", "--no-progress"]


def multilabel_tree(dev_data: Path, root: Path, train_patients: int = 12, test_patients: int = 4) -> Path:
    """``patientNNNNN/study{1,2}/view1_frontal.jpg`` (two studies per patient, one dev class per patient) and
    ``labels.csv``: Pneumonia is the dev class, Opacity the dev class with one row in five flipped, Edema 1/0/-1/
    blank in turn (noise, uncertain and blank); a few Pneumonia and Opacity values are -1 or blank too. Test
    patients carry split 'test', the others none (extract draws validation from them)."""
    rows, number = [], 0
    for split, per_class in (("train", train_patients), ("test", test_patients)):
        for label, name in enumerate(("NORMAL", "PNEUMONIA")):
            sources = sorted((dev_data / split / name).iterdir())[:2 * per_class]
            for i in range(per_class):
                number += 1
                for study, source in enumerate(sources[2 * i:2 * i + 2], start=1):
                    relative = f"patient{number:05d}/study{study}/view1_frontal.jpg"
                    (root / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, root / relative)
                    k = len(rows)
                    rows.append({"path": relative, "Pneumonia": str(label),
                                 "Opacity": str(1 - label if k % 5 == 4 else label),
                                 "Edema": ("1", "0", "-1", "")[k % 4], "split": "test" if split == "test" else ""})
    rows[0]["Pneumonia"], rows[2]["Opacity"], rows[5]["Pneumonia"] = "-1", "", ""
    return write_csv(root / "labels.csv", rows)


def expected_targets(csv_path: Path, policy: str = "ignore") -> dict[str, list[float]]:
    import csv

    resolve = {"ignore": np.nan, "zero": 0.0, "one": 1.0}[policy]
    with open(csv_path, newline="") as handle:
        return {r["path"]: [resolve if r[c] in ("", "-1") else float(r[c]) for c in LABELS]
                for r in csv.DictReader(handle)}


def only_cache(cache_dir: Path) -> Path:
    return next(p for p in sorted(cache_dir.glob("tiny-*.h5")) if not p.name.endswith(".weights.h5"))


@pytest.fixture(scope="module")
def tree(dev_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlabel") / "data"
    return root, multilabel_tree(dev_data, root)


def test_extract_stores_masked_targets_for_every_row(tree, tmp_path):
    from featcache.cache import is_multilabel, load_pooled, read_manifest
    from featcache.verify import verify_cache

    root, csv_path = tree
    result = run_cli("extract", "--data", root, "--labels", csv_path, "--cache-dir", tmp_path / "c",
                     "--shard-rows", "16", *FAST)
    assert result.exit_code == 0, result.output
    assert "patients: 32 patients in 64 images" in result.output
    cache = only_cache(tmp_path / "c")
    manifest = read_manifest(cache)
    assert is_multilabel(manifest) and manifest["class_names"] == list(LABELS)
    assert manifest["labels"]["kind"] == "multilabel" and manifest["labels"]["uncertain"] == "ignore"
    assert len(manifest["shards"]) > 1  # /targets sits in the master over several shards
    data = load_pooled(cache)
    with h5py.File(cache, "r") as handle:
        paths = handle["files/path"].asstr()[...]
        assert (handle["labels"][...] == -1).all() and (handle["files/label"][...] == -1).all()
    wanted = expected_targets(csv_path)
    expected = np.array([wanted[paths[s]] for s in data.source_index], np.float32)
    assert data.targets.shape == (len(data.labels), 3) and data.targets.dtype == np.float32
    np.testing.assert_array_equal(data.targets, expected)  # copies carry their original's targets, NaN where masked
    assert np.isnan(data.targets).any()
    assert verify_cache(cache).ok
    assert run_cli("compact", cache).exit_code == 0  # one plain file: /targets copied and checked
    np.testing.assert_array_equal(load_pooled(cache).targets, expected)
    assert verify_cache(cache).ok
    info = run_cli("info", cache)
    assert "labels (multi-label) ['Pneumonia', 'Opacity', 'Edema']" in info.output


def test_uncertain_policy_is_in_the_fingerprint_and_the_targets(tree, tmp_path):
    from featcache.cache import load_pooled

    root, csv_path = tree
    args = ["extract", "--data", root, "--labels", csv_path, "--cache-dir", tmp_path / "c", *FAST,
            "--augment-copies", "0"]
    assert run_cli(*args).exit_code == 0
    assert run_cli(*args, "--uncertain", "one").exit_code == 0
    caches = [p for p in sorted((tmp_path / "c").glob("tiny-*.h5")) if not p.name.endswith(".weights.h5")]
    assert len(caches) == 2
    by_policy = {}
    for cache in caches:
        data = load_pooled(cache)
        by_policy[data.manifest["labels"]["uncertain"]] = data
    one = by_policy["one"]
    assert not np.isnan(one.targets).any()
    assert by_policy["ignore"].manifest["fingerprint"] != one.manifest["fingerprint"]
    masked = np.isnan(by_policy["ignore"].targets)
    assert masked.any() and (one.targets[masked] == 1).all()


def test_a_binary_cache_has_no_targets_and_damaged_targets_are_refused(tree, tmp_path):
    from featcache.cache import is_multilabel, open_cache, read_manifest
    from featcache.errors import DamagedFileError
    from featcache.verify import verify_cache

    root, csv_path = tree
    base = ["extract", "--data", root, "--labels", csv_path, *FAST, "--augment-copies", "0"]
    assert run_cli(*base, "--label-columns", "Pneumonia", "--cache-dir", tmp_path / "b").exit_code == 0
    binary = only_cache(tmp_path / "b")
    manifest = read_manifest(binary)
    assert "targets" not in manifest["datasets"] and not is_multilabel(manifest) and "task" not in manifest
    with h5py.File(binary, "r") as handle:
        assert "targets" not in handle
    assert run_cli(*base, "--cache-dir", tmp_path / "m").exit_code == 0
    cache = only_cache(tmp_path / "m")
    with h5py.File(cache, "r+") as handle:
        values = handle["targets"][...]
        row, col = np.argwhere(np.isfinite(values))[0]
        handle["targets"][row, col] = 1 - values[row, col]  # still 0/1: only the SHA-256 can tell
    assert not verify_cache(cache).ok
    from featcache.checksums import read_checked

    with open_cache(cache) as handle, pytest.raises(DamagedFileError, match="targets"):
        read_checked(handle, "targets", read_checked(handle, "split"))


def test_a_label_without_both_values_in_a_split_is_one_line(tree, tmp_path):
    import csv

    root, csv_path = tree
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        if row["split"] == "test":
            row["Edema"] = "0" if row["Edema"] == "1" else row["Edema"]
    edited = write_csv(tmp_path / "edited.csv", rows)
    result = run_cli("extract", "--data", root, "--labels", edited, "--cache-dir", tmp_path / "c", *FAST)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "Label 'Edema'" in result.output and "test split" in result.output
    for row in rows:
        row["Opacity"] = "1"
    result = run_cli("extract", "--data", root, "--labels", write_csv(tmp_path / "one.csv", rows),
                     "--cache-dir", tmp_path / "c", *FAST)
    assert result.exit_code == 1 and "single value" in result.output, result.output
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("*.h5"))
