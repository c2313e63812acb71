import json
import re
import shutil

import numpy as np
import pytest
from conftest import write_png

from featcache.data import (
    find_images,
    read_split_registry,
    split_patients,
    write_split_registry,
)
from featcache.decode import (
    decode_bytes,
    load_image,
)
from featcache.errors import DamagedFileError, DataError
from featcache.patients import patient_id


@pytest.mark.parametrize("name, expected", [
    ("person1430_bacteria_3695.jpeg", "person1430"),
    ("IM-0117-0001.jpeg", "IM-0117"),
    ("NORMAL2-IM-0373-0001.jpeg", "NORMAL2-IM-0373"),
    ("scan_42.png", "scan_42"),  # unknown pattern: each file is its own patient
])
def test_patient_id(name, expected):
    assert patient_id(name) == expected


def test_dev_split_is_grouped_by_patient_and_near_80_20(dev_data):
    folder = find_images(dev_data, seed=0)
    assert folder.class_names == ("NORMAL", "PNEUMONIA")
    assert len(folder.records) == 451
    by_split = {}
    for r in folder.records:
        by_split.setdefault(r.split, set()).add(r.patient)
    assert not by_split["train"] & by_split["val"]
    assert all(r.path.startswith("test/") == (r.split == "test") for r in folder.records)
    for label in (0, 1):  # stratified: each class within one patient of 20 % (no patient has > 3 images)
        pool = [r for r in folder.records if r.label == label and r.split != "test"]
        val = sum(r.split == "val" for r in pool)
        assert abs(val - 0.2 * len(pool)) <= 3, (label, val, len(pool))


def test_split_patients_is_stratified_reproducible_and_seeded():
    patients = {f"n{i}": (0, 1 + i % 3) for i in range(40)} | {f"p{i}": (1, 1) for i in range(100)}
    a = split_patients(patients, seed=0)
    assert a == split_patients(dict(reversed(patients.items())), seed=0)
    assert a != split_patients(patients, seed=1)
    for label, total in ((0, sum(1 + i % 3 for i in range(40))), (1, 100)):
        val = sum(n for p, (lab, n) in patients.items() if lab == label and a[p] == "val")
        assert abs(val - 0.2 * total) <= 3


def test_adding_images_never_moves_existing_ones(small_xrays, dev_data):
    first = find_images(small_xrays, seed=0)
    before = {r.path: r.split for r in first.records}
    for file in sorted((dev_data / "train" / "PNEUMONIA").iterdir())[50:90]:
        shutil.copyfile(file, small_xrays / "train" / "PNEUMONIA" / file.name)
    previous = {r.patient: r.split for r in first.records if r.split != "test"}
    after = {r.path: r.split for r in find_images(small_xrays, seed=0, previous_split=previous).records}
    assert len(after) == len(before) + 40
    assert all(after[p] == s for p, s in before.items())
    new_val = sum(s == "val" for p, s in after.items() if p not in before)
    assert 4 <= new_val <= 12  # the additions are split too, keeping the class near 20 %


def test_val_folder_is_pooled_and_resplit(small_xrays):
    (small_xrays / "val" / "NORMAL").mkdir(parents=True)
    shutil.move(next((small_xrays / "train" / "NORMAL").iterdir()), small_xrays / "val" / "NORMAL")
    records = find_images(small_xrays, seed=0).records
    moved = [r for r in records if r.path.startswith("val/")]
    assert len(moved) == 1 and moved[0].split in ("train", "val")
    assert {r.split for r in records if r.patient == moved[0].patient} == {moved[0].split}


@pytest.mark.parametrize("layout, message", [
    ({}, "does not exist"),
    ({"train/NORMAL/a.png": 1}, "no test/ folder"),
    ({"train/NORMAL/a.png": 1, "test/NORMAL/b.png": 1}, "at least two class folders"),
    ({"train/NORMAL/a.png": 1, "train/PNEUMONIA/b.png": 1, "test/NORMAL/c.png": 1}, "no folder for class PNEUMONIA"),
    ({"train/NORMAL/a.png": 1, "train/PNEUMONIA/": 0, "test/NORMAL/c.png": 1, "test/PNEUMONIA/d.png": 1},
     "holds no JPEG, PNG or DICOM"),
])
def test_bad_layouts_are_one_line_errors(tmp_path, layout, message):
    root = tmp_path / "data"
    for rel, n in layout.items():
        if rel.endswith("/"):
            (root / rel).mkdir(parents=True)
        else:
            write_png(root / rel, np.zeros((8, 8, 1), np.uint8))
    with pytest.raises(DataError, match=message) as info:
        find_images(root if layout else tmp_path / "missing", seed=0)
    assert "\n" not in str(info.value)


def test_every_color_mode_becomes_rgb_at_the_image_size(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (30, 50, 1), dtype=np.uint8)
    cases = {
        "gray": gray,
        "rgb": np.repeat(gray, 3, axis=2),
        "rgba": np.concatenate([np.repeat(gray, 3, axis=2), np.full((30, 50, 1), 7, np.uint8)], axis=2),
        "gray16": gray.astype(np.uint16) * 257,
    }
    out = {name: load_image(write_png(tmp_path / f"{name}.png", a), 32) for name, a in cases.items()}
    for name, image in out.items():
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8, name
        assert (image[..., 0] == image[..., 2]).all(), name
    assert (out["gray"] == out["rgb"]).all() and (out["gray"] == out["rgba"]).all()
    assert np.abs(out["gray"].astype(int) - out["gray16"]).max() <= 1


def test_palette_and_jpeg_inputs(tmp_path, dev_data):
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("P").save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png", 32).shape == (32, 32, 3)
    jpeg = next((dev_data / "test" / "PNEUMONIA").iterdir())
    image = load_image(jpeg, 64)
    assert image.shape == (64, 64, 3) and image.std() > 10


def test_broken_files_raise_data_error(bad_inputs):
    for file in sorted(bad_inputs.iterdir()):
        with pytest.raises(DataError, match=file.name):
            load_image(file, 32)
    with pytest.raises(DataError, match="empty"):
        decode_bytes(b"", 32)


def test_split_registry_round_trip_and_corruption(tmp_path):
    assert read_split_registry(tmp_path, seed=3) == {}
    write_split_registry(tmp_path, 3, {"p2": "val", "p1": "train"})
    assert read_split_registry(tmp_path, seed=3) == {"p1": "train", "p2": "val"}
    assert read_split_registry(tmp_path, seed=4) == {}
    (tmp_path / "split-seed3.json").write_text("{broken")
    with pytest.raises(DamagedFileError, match="split-seed3.json is not valid JSON"):
        read_split_registry(tmp_path, seed=3)


@pytest.mark.parametrize("record, message", [
    ({"seed": 3, "patients": {"p1": "train", "p2": "test"}}, "'p2' is assigned 'test'"),  # would move p2 into test
    ({"seed": 3, "patients": {"p1": "val", "p2": 1}}, "'p2' is assigned 1"),
    ({"seed": 3, "patients": {"p1": None}}, "'p1' is assigned None"),
    ({"seed": 3, "patients": ["p1", "train"]}, "field 'patients' is list, expected dict"),
    ({"seed": "3", "patients": {}}, "field 'seed' is str, expected int"),
    ({"seed": 4, "patients": {"p1": "train"}}, "seed 4 instead of 3"),
    ({"patients": {"p1": "train"}}, "field 'seed' is missing"),
])
def test_edited_split_registry_is_refused(tmp_path, record, message):
    (tmp_path / "split-seed3.json").write_text(json.dumps(record))
    with pytest.raises(DamagedFileError, match=re.escape(message)) as error:
        read_split_registry(tmp_path, seed=3)
    assert "split-seed3.json" in str(error.value) and "\n" not in str(error.value)


def test_decoder_errors_say_what_is_wrong(bad_inputs):
    with pytest.raises(DataError, match="Invalid JPEG data"):
        load_image(bad_inputs / "truncated.jpeg", 32)
    with pytest.raises(DataError, match="Unknown image file format"):
        load_image(bad_inputs / "notes.jpeg", 32)


def test_a_registry_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    import os

    os.mkfifo(tmp_path / "split-seed3.json")  # reading it would block forever
    with pytest.raises(DamagedFileError, match="is not a regular file"):
        read_split_registry(tmp_path, seed=3)
