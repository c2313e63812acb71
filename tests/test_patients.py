"""Patient ids on each layout: Kermany names, a CheXpert tree, MIMIC-like names with --patient-pattern,
DICOM PatientID, the label file's patient column; and the loud warnings when the grouping looks wrong."""

import logging

import pytest
from datasets import chexpert_tree

from featcache.data import find_images
from featcache.errors import DataError
from featcache.labels import read_label_file
from featcache.labelset import find_labeled_images
from featcache.patients import FOLDER_RULE, assign_patients, describe_patients, patient_id

MIMIC = [f"files/p1{i % 3}/p1000{i:04d}/s5{j}0000{i:02d}/{i:02x}{j}a7f3e-bde0afdd-112c0b34.jpg"
         for i in range(6) for j in range(3)]


def test_kermany_names_keep_their_rule_and_add_no_new_rule(dev_data):
    folder = find_images(dev_data, seed=0)
    assert folder.patient_rules == ()
    by_path = {r.path: r.patient for r in folder.records}
    assert by_path["train/PNEUMONIA/person1003_virus_1685.jpeg"] == "person1003"
    assert all(patient == patient_id(path) for path, patient in by_path.items())  # the file-name rule, as before


def test_chexpert_tree_groups_by_the_patient_folder(dev_data, tmp_path):
    csv_path = chexpert_tree(dev_data, tmp_path)
    labels = read_label_file(csv_path, tmp_path, ("Pneumonia",))
    folder = find_labeled_images(tmp_path, labels, seed=0)
    for record in folder.records:
        assert record.patient == record.path.split("/")[2], record
    assert FOLDER_RULE in folder.patient_rules
    assert len({r.patient for r in folder.records}) == 20 and len(folder.left_out) == 2
    splits = {}
    for record in folder.records:
        splits.setdefault(record.patient, set()).add(record.split)
    assert all(len(s) == 1 for s in splits.values())  # a patient's images stay in one split
    assert {r.split for r in folder.records if "/valid/" in r.path} == {"test"}


def test_repeated_names_use_the_nearest_unique_folder_but_never_a_layout_folder():
    paths = ["train/NORMAL/a/study1/view1.png", "train/NORMAL/b/study1/view1.png", "train/NORMAL/b/study2/view1.png",
             "train/NORMAL/img1.png", "test/NORMAL/img1.png", "train/PNEUMONIA/x.png"]
    ids, rules = assign_patients(paths, layout_depth=2)
    assert ids == {"train/NORMAL/a/study1/view1.png": "a", "train/NORMAL/b/study1/view1.png": "b",
                   "train/NORMAL/b/study2/view1.png": "study2",
                   "train/NORMAL/img1.png": "train/NORMAL/img1", "test/NORMAL/img1.png": "test/NORMAL/img1",
                   "train/PNEUMONIA/x.png": "x"}
    assert rules == [FOLDER_RULE]


def test_mimic_names_need_a_pattern_and_the_pattern_groups_them(caplog):
    ids, _ = assign_patients(MIMIC)
    assert len(set(ids.values())) == len(MIMIC)
    with caplog.at_level(logging.WARNING):
        describe_patients(list(ids.values()))
    assert "every one of the 18 images is its own patient" in caplog.text
    ids, rules = assign_patients(MIMIC, pattern=r"p1\d/(p\d+)/")
    assert sorted(set(ids.values())) == [f"p1000{i:04d}" for i in range(6)] and "--patient-pattern" in rules[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert describe_patients(list(ids.values())) == "6 patients in 18 images"
    assert caplog.text == ""
    with pytest.raises(DataError, match=r"matches no patient in files/.* \(18 of 18 paths do not match\)"):
        assign_patients(MIMIC, pattern=r"(q\d+)")


def test_one_patient_with_most_images_is_a_loud_warning(caplog):
    with caplog.at_level(logging.WARNING):
        describe_patients(["a"] * 6 + ["b", "c", "d"])
    assert "patient 'a' holds 6 of the 9 images" in caplog.text


def test_dicom_patient_id_then_label_column_win(tmp_path):
    paths = ["x/1.png", "y/1.png", "z.dcm"]
    ids, rules = assign_patients(paths, dicom_ids={"z.dcm": "PAT-7"})
    assert ids == {"x/1.png": "x", "y/1.png": "y", "z.dcm": "PAT-7"} and "DICOM PatientID tag" in rules


def test_label_file_patient_column_wins(dev_data, tmp_path):
    from datasets import write_csv

    csv_path = chexpert_tree(dev_data, tmp_path)
    rows = list(__import__("csv").DictReader(open(csv_path)))
    for i, row in enumerate(rows):
        row["patient"] = f"H{i // 4}"  # two CheXpert patients per hospital id
    write_csv(csv_path, rows)
    labels = read_label_file(csv_path, tmp_path, ("Pneumonia",))
    folder = find_labeled_images(tmp_path, labels, seed=0)
    assert {r.path: r.patient for r in folder.records} == {
        row["path"]: row["patient"] for row in rows if row["path"] in {r.path for r in folder.records}}
    assert folder.patient_rules == ("label file 'patient' column",)


def test_the_model_card_extract_command_repeats_the_patient_pattern_and_label_file():
    import shlex

    from featcache.cardtext import extract_command
    from featcache.patients import pattern_of_rule, pattern_rule

    pattern = r"p1\d/(p\d+)/ 'x'"  # a space and quotes: the command must quote it for the shell
    assert pattern_of_rule(pattern_rule(pattern)) == pattern and pattern_of_rule("a folder rule") is None
    manifest = {"data_dir": "/data", "backbone": "tiny", "weights": {"source": "random"}, "image_size": 32,
                "augment": {"copies": 0}, "seed": 0, "dtype": "float16",
                "split": {"patient_rules": [pattern_rule(pattern)]},
                "labels": {"file": "/data/my labels.csv", "columns": ["Pneumonia"], "uncertain": "ignore"}}
    argv = shlex.split(extract_command(manifest))
    assert argv[argv.index("--patient-pattern") + 1] == pattern
    assert argv[argv.index("--labels") + 1] == "/data/my labels.csv"
    del manifest["labels"], manifest["split"]
    assert "--patient-pattern" not in extract_command(manifest) and "--labels" not in extract_command(manifest)
