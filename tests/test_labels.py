"""Label files: kinds, the --uncertain policies, every bad input as one line naming the row, the fingerprint
covering the file, and a label-file data set through extract, train-head and evaluate."""

import csv
import hashlib
import json

import numpy as np
import pytest
from datasets import chexpert_tree, write_csv
from pipeline import run_cli

from featcache.errors import DataError
from featcache.labels import read_label_file
from featcache.labelset import find_labeled_images

FAST = ["--backbone", "tiny", "--weights", "random", "--image-size", "32", "--augment-copies", "1", "--no-progress"]


@pytest.fixture
def chexpert(dev_data, tmp_path):
    """(data folder, CSV) of the CheXpert-like tree: 20 patients, 40 images, Sex/Pneumonia/Edema columns."""
    root = tmp_path / "chexpert"
    return root, chexpert_tree(dev_data, root)


def rows_of(csv_path):
    with open(csv_path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_one_class_name_column_is_single_label(tmp_path):
    (tmp_path / "a.png").touch(), (tmp_path / "b.png").touch(), (tmp_path / "c.png").touch()
    path = write_csv(tmp_path / "l.csv", [{"path": "a.png", "finding": "viral"}, {"path": "./b.png", "finding": "bacterial"},
                                          {"path": "c.png", "finding": ""}])
    labels = read_label_file(path, tmp_path)
    assert labels.kind == "single" and labels.class_names == ("bacterial", "viral")
    assert [(r.path, r.label) for r in labels.rows] == [("a.png", 1), ("b.png", 0)]
    assert labels.left_out == ({"path": "c.png", "line": 4, "reason": "blank finding"},)


@pytest.mark.parametrize("policy, expected", [("ignore", [np.nan, 1, np.nan, 0]), ("zero", [0, 1, 0, 0]),
                                              ("one", [1, 1, 1, 0])])
def test_uncertain_policy_on_several_columns(tmp_path, policy, expected):
    for name in "abcd":
        (tmp_path / f"{name}.png").touch()
    path = write_csv(tmp_path / "l.csv", [{"path": "a.png", "A": "-1", "B": "1"}, {"path": "b.png", "A": "1", "B": "0"},
                                          {"path": "c.png", "A": "", "B": "1.0"}, {"path": "d.png", "A": "0", "B": "0"}])
    labels = read_label_file(path, tmp_path, uncertain=policy)
    assert labels.kind == "multilabel" and labels.columns == ("A", "B")
    np.testing.assert_array_equal(labels.targets()[:, 0], np.array(expected, np.float32))
    np.testing.assert_array_equal(labels.targets()[:, 1], [1, 0, 1, 0])


def test_one_binary_column_is_the_reference_two_class_task(chexpert):
    root, csv_path = chexpert
    labels = read_label_file(csv_path, root, ("Pneumonia",), uncertain="ignore")
    assert labels.kind == "binary" and labels.class_names == ("not_Pneumonia", "Pneumonia")
    assert len(labels.rows) == 38 and [item["line"] for item in labels.left_out] == [2, 5]
    assert len(read_label_file(csv_path, root, ("Pneumonia",), uncertain="one").rows) == 40


def _bad(tmp_path, rows, **kwargs):
    (tmp_path / "data" / "img").mkdir(parents=True)
    for i in range(4):
        (tmp_path / "data" / "img" / f"{i}.png").touch()
    return read_label_file(write_csv(tmp_path / "l.csv", rows), tmp_path / "data", **kwargs)


@pytest.mark.parametrize("rows, message", [
    ([{"path": "img/0.png", "y": "1"}, {"path": "img/nope.png", "y": "0"}], r"line 3: img/nope.png does not exist in"),
    ([{"path": "img/0.png", "y": "1"}, {"path": "img", "y": "0"}], r"line 3: img is a folder, not a file"),
    ([{"path": "img/0.png", "y": "1"}, {"path": "img//0.png", "y": "0"}], r"line 3: path 'img/0.png' is listed twice \(also line 2\)"),
    ([{"path": "img/0.png", "y": "1"}, {"path": "../data/img/1.png", "y": "0"}], r"line 3: path '../data/img/1.png' is not a path inside"),
    ([{"path": "img/0.png", "y": "1"}, {"path": "img/../img/1.png", "y": "0"}], r"line 3: .*not a path inside"),
    ([{"path": "/etc/passwd", "y": "1"}], r"line 2: path '/etc/passwd' is not a path inside"),
    ([{"path": "img/0.png", "y": "1", "z": "0"}, {"path": "img/1.png", "y": "0", "z": "yes"}], r"line 3: column 'z' holds 'yes'"),
    ([{"path": "img/0.png", "y": "1", "z": "0"}, {"path": "img/1.png", "y": "0", "z": "2"}], r"line 3: column 'z' holds '2'"),
    ([{"path": "img/0.png", "y": "1"}, {"path": "img/1.png", "y": "maybe"}], r"line 3: column 'y' holds 'maybe' among numbers"),
    ([{"path": "img/0.png", "y": "1"}, {"path": "img/1.png", "y": "1"}, {"path": "img/2.png", "y": "-1"}], r"column 'y' .* single value \['1'\]"),
    ([{"path": "img/0.png", "y": "a"}, {"path": "img/1.png", "y": "a"}], r"column 'y' .* single value \['a'\]"),
    ([{"path": "img/0.png", "y": "a", "split": "holdout"}], r"line 2: split 'holdout' is not train, val, test"),
    ([{"file": "img/0.png", "y": "a"}], r"has no 'path' column"),
    ([{"path": "img/0.png", "patient": "p", "split": "test"}], r"no label column besides path/patient/split"),
])
def test_bad_label_files_are_one_line_errors_naming_the_row(tmp_path, rows, message):
    with pytest.raises(DataError, match=message) as info:
        _bad(tmp_path, rows)
    assert "\n" not in str(info.value) and "Received:" in str(info.value)


def test_unknown_label_column_and_split_problems(chexpert, tmp_path):
    root, csv_path = chexpert
    with pytest.raises(DataError, match=r"--label-columns 'Cardiomegaly' is not a label column .* Received"):
        read_label_file(csv_path, root, ("Cardiomegaly",))
    rows = rows_of(csv_path)
    no_test = write_csv(tmp_path / "notest.csv", [{**row, "split": ""} for row in rows])
    with pytest.raises(DataError, match="has no row with split 'test'"):
        find_labeled_images(root, read_label_file(no_test, root, ("Pneumonia",)), seed=0)
    # every Pneumonia-positive test row moved to train: the class has no test image
    moved = [{**row, "split": "train" if row["split"] == "test" and row["Pneumonia"] == "1" else row["split"]}
             for row in rows]
    with pytest.raises(DataError, match=r"Class 'Pneumonia' of .* has no image in the test split"):
        find_labeled_images(root, read_label_file(write_csv(tmp_path / "m.csv", moved), root, ("Pneumonia",)), seed=0)


def test_the_split_column_wins_and_blank_rows_follow_their_patient(chexpert, tmp_path):
    root, csv_path = chexpert
    rows = rows_of(csv_path)
    rows[6]["split"] = "val"  # patient00004 view1; its view2 (row 7) is blank
    rows[9]["split"] = "train"  # patient00005 view2
    labels = read_label_file(write_csv(tmp_path / "s.csv", rows), root, ("Pneumonia",))
    split = {r.path: r.split for r in find_labeled_images(root, labels, seed=0).records}
    assert split[rows[6]["path"]] == split[rows[7]["path"]] == "val"
    assert split[rows[8]["path"]] == split[rows[9]["path"]] == "train"


def test_extract_train_head_evaluate_on_a_label_file(chexpert, tmp_path):
    root, csv_path = chexpert
    cache_dir = tmp_path / "cache"
    broken = next(r["path"] for r in rows_of(csv_path) if r["split"] == "test")
    (root / broken).write_bytes(b"not an image")  # skipped at extraction, reported by evaluate as a test file
    result = run_cli("extract", "--data", root, "--labels", csv_path, "--label-columns", "Pneumonia",
                     "--cache-dir", cache_dir, *FAST)
    assert result.exit_code == 0, result.output
    assert "patients: 20 patients in 38 images" in result.output
    assert "left out 2 label-file rows without a certain label" in result.output
    cache = next(p for p in cache_dir.glob("tiny-*.h5") if not p.name.endswith(".weights.h5"))
    from featcache.cache import read_manifest

    manifest = read_manifest(cache)
    assert manifest["class_names"] == ["not_Pneumonia", "Pneumonia"]
    assert manifest["labels"]["sha256"] == hashlib.sha256(csv_path.read_bytes()).hexdigest()
    assert manifest["labels"]["left_out"] == 2 and [x["line"] for x in manifest["labels"]["left_out_examples"]] == [2, 5]
    assert manifest["counts"]["test"] == 7 and manifest["counts"]["train"] + manifest["counts"]["val"] == 30
    info = run_cli("info", str(cache))
    assert f"labels from {csv_path.resolve()} (sha256 {manifest['labels']['sha256'][:12]}), columns Pneumonia" in info.output
    result = run_cli("train-head", "--cache-dir", cache_dir, "--trials", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    result = run_cli("evaluate", "--cache-dir", cache_dir, "--bootstrap", "50", "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads((cache_dir / "runs" / cache.stem / "report.json").read_text())
    assert sorted(report["predictions"]["path"]) == sorted(r["path"] for r in rows_of(csv_path)
                                                           if r["split"] == "test" and r["path"] != broken)
    assert [s["path"] for s in report["test"]["skipped_at_extraction"]] == [broken]
    result = run_cli("verify", cache_dir)
    assert result.exit_code == 0, result.output


def test_mimic_like_names_with_a_patient_pattern_through_the_cli(dev_data, tmp_path, caplog):
    """MIMIC-style paths (a unique name per image): without --patient-pattern every image is its own patient
    and extract warns; with it, the images of a patient share one id and one split."""
    root, rows = tmp_path / "mimic", []
    for split, per_class in (("train", 6), ("test", 2)):
        for label, name in enumerate(("NORMAL", "PNEUMONIA")):
            sources = sorted((dev_data / split / name).iterdir())[:2 * per_class]
            for i, source in enumerate(sources):
                patient = f"p1{label}{split[:2]}{i // 2:04d}"
                relative = f"files/p1{label}/{patient}/s5{i:07d}/{hashlib.sha256(source.name.encode()).hexdigest()[:16]}.jpg"
                (root / relative).parent.mkdir(parents=True, exist_ok=True)
                (root / relative).write_bytes(source.read_bytes())
                rows.append({"path": relative, "Pneumonia": str(label), "split": "test" if split == "test" else ""})
    csv_path = write_csv(tmp_path / "mimic.csv", rows)
    common = ["--data", root, "--labels", csv_path, *FAST, "--augment-copies", "0"]
    with caplog.at_level("WARNING"):
        result = run_cli("extract", *common, "--cache-dir", tmp_path / "c1")
    assert result.exit_code == 0 and "patients: 32 patients in 32 images" in result.output, result.output
    assert "WARNING: every one of the 32 images is its own patient" in caplog.text
    caplog.clear()
    result = run_cli("extract", *common, "--cache-dir", tmp_path / "c2", "--patient-pattern", r"p1\d/(p\w+)/")
    assert result.exit_code == 0 and "patients: 16 patients in 32 images" in result.output, result.output
    assert "WARNING" not in caplog.text
    cache = next(p for p in (tmp_path / "c2").glob("tiny-*.h5") if not p.name.endswith(".weights.h5"))
    import h5py

    with h5py.File(cache, "r") as handle:
        table = list(zip(handle["files/patient"][:].astype(str), handle["files/split"][:]))
    assert all(p == path.split("/")[2] for (p, _), path in zip(table, sorted(r["path"] for r in rows)))
    by_patient = {}
    for patient, split in table:
        by_patient.setdefault(patient, set()).add(int(split))
    assert all(len(s) == 1 for s in by_patient.values())


def test_a_bad_label_column_is_refused_in_one_line_and_nothing_is_lost(chexpert, tmp_path):
    root, csv_path = chexpert
    cache_dir = tmp_path / "cache"
    assert run_cli("extract", "--data", root, "--labels", csv_path, "--label-columns", "Pneumonia",
                   "--cache-dir", cache_dir, *FAST).exit_code == 0
    before = {p.name: p.read_bytes() for p in cache_dir.iterdir() if p.is_file()}
    for extra, message in (([], "column 'Sex' holds 'Female'"),):
        result = run_cli("extract", "--data", root, "--labels", csv_path, "--cache-dir", cache_dir, *extra, *FAST)
        assert result.exit_code == 1 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in cache_dir.iterdir() if p.is_file()} == before


def test_the_fingerprint_covers_the_label_file_and_the_policy(chexpert, tmp_path, extract_config):
    from featcache.extract import extract_features

    root, csv_path = chexpert
    config = dict(labels=csv_path, label_columns=("Pneumonia",), augment_copies=0, image_size=32)
    first = extract_features(extract_config(root, **config))[0].cache_path
    policy = extract_features(extract_config(root, uncertain="zero", **config))[0].cache_path
    rows = rows_of(csv_path)
    rows[10]["Pneumonia"] = "1" if rows[10]["Pneumonia"] == "0" else "0"
    edited = extract_features(extract_config(root, **{**config, "labels": write_csv(tmp_path / "e.csv", rows)}))[0]
    assert len({first, policy, edited.cache_path}) == 3 and first.exists() and policy.exists()


def test_class_folders_keep_their_fingerprint_settings_and_label_files_add_theirs(small_xrays, chexpert,
                                                                                  extract_config):
    """The real settings builder: a Kermany folder adds no key (its caches keep their fingerprints); a label
    file adds its hash and options, and its repeated file names the folder rule."""
    from featcache import extract
    from featcache.backbones import get_backbone_spec
    from featcache.data import find_images

    spec = get_backbone_spec("tiny")
    config = extract_config(small_xrays)
    plain = extract._feature_settings(config, spec, "0" * 64, "float32")
    assert extract._feature_settings(config, spec, "0" * 64, "float32", find_images(small_xrays, 0)) == plain
    root, csv_path = chexpert
    config = extract_config(root, labels=csv_path, label_columns=("Pneumonia",))
    folder = extract._find_data(config, {})
    labeled = extract._feature_settings(config, spec, "0" * 64, "float32", folder)
    assert labeled["labels"] == {"sha256": hashlib.sha256(csv_path.read_bytes()).hexdigest(), "kind": "binary",
                                 "columns": ["Pneumonia"], "uncertain": "ignore"}
    assert "nearest folder" in labeled["split"]["patient_rules"][0] and "dicom" not in labeled
