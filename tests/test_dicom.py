"""DICOM decoding: lossless encodings of dev JPEGs give the JPEG's pixels (and so its features); files
without pixel data or with an undecodable transfer syntax are one-line errors, skipped by extract."""

import numpy as np
import pytest
from datasets import dicom_variants, gray_sources, jpeg_gray, write_csv, write_dicom

from featcache.decode import decode_bytes, load_image
from featcache.dicom import dicom_patient_id, dicom_to_gray, is_dicom_file
from featcache.errors import DataError, ImageTooLargeError


@pytest.fixture(scope="module")
def source(dev_data):
    return gray_sources(dev_data, "train", "NORMAL", 1)[0]


@pytest.fixture
def variants(source, tmp_path):
    return dicom_variants(source, tmp_path / "dicom")


@pytest.mark.parametrize("variant", ["mono2_8bit", "mono1_inverted", "window_16bit"])
def test_lossless_dicom_decodes_to_the_source_jpeg_pixels(variants, source, variant):
    full = dicom_to_gray(variants[variant].read_bytes(), variant)
    assert full.dtype == np.uint8 and full.shape == (*jpeg_gray(source).shape, 1)
    np.testing.assert_array_equal(full[..., 0], jpeg_gray(source))
    np.testing.assert_array_equal(load_image(variants[variant], 48), load_image(source, 48))


def test_rgb_dicom_decodes_to_the_pixels_of_a_png(source, tmp_path):
    """An 8-bit RGB DICOM goes through the same resize as a colour PNG of the same pixels (three channels,
    not the gray path)."""
    from PIL import Image

    gray = jpeg_gray(source)
    rgb = np.stack([gray, 255 - gray, gray // 2], axis=2)
    dicom = write_dicom(tmp_path / "rgb.dcm", rgb, "RGB")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(dicom_to_gray(dicom.read_bytes()), rgb)
    decoded = load_image(dicom, 48)
    assert decoded.shape == (48, 48, 3) and not np.array_equal(decoded[..., 0], decoded[..., 1])
    np.testing.assert_array_equal(decoded, load_image(tmp_path / "rgb.png", 48))


def test_the_window_and_monochrome1_change_the_pixels(source, tmp_path):
    """The conversion reads the tags: a narrower window saturates, MONOCHROME1 without inverted data is a negative."""
    gray = jpeg_gray(source)
    narrow = write_dicom(tmp_path / "narrow.dcm", gray, WindowCenter=128, WindowWidth=64)
    negative = write_dicom(tmp_path / "negative.dcm", gray, "MONOCHROME1")
    full = write_dicom(tmp_path / "full16.dcm", gray.astype(np.uint16) * 8, bits=16)  # no window: 16 stored bits
    windowed = dicom_to_gray(narrow.read_bytes())[..., 0]
    assert set(np.unique(windowed[gray < 96])) == {0} and set(np.unique(windowed[gray >= 160])) == {255}
    np.testing.assert_array_equal(dicom_to_gray(negative.read_bytes())[..., 0], 255 - gray)
    expected = np.round(gray.astype(np.float64) * 8 * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(dicom_to_gray(full.read_bytes())[..., 0], expected)


def test_preamble_and_patient_id(variants, tmp_path):
    assert is_dicom_file(variants["window_16bit"]) and variants["window_16bit"].suffix == ""
    assert not is_dicom_file(tmp_path / "missing") and dicom_patient_id(variants["mono2_8bit"]) == "P1"


def test_bad_dicoms_are_one_line_data_errors(source, tmp_path):
    gray = jpeg_gray(source)
    no_pixels = write_dicom(tmp_path / "nopixels.dcm", gray, pixel_data=False)
    with pytest.raises(DataError, match="without pixel data") as info:
        load_image(no_pixels, 32)
    assert "\n" not in str(info.value)
    mpeg = write_dicom(tmp_path / "mpeg.dcm", gray, syntax="1.2.840.10008.1.2.4.100")
    with pytest.raises(DataError, match=r"cannot be decoded \(transfer syntax .*1\.2\.840\.10008\.1\.2\.4\.100") as info:
        load_image(mpeg, 32)
    assert "\n" not in str(info.value)
    with pytest.raises(ImageTooLargeError):
        decode_bytes(write_dicom(tmp_path / "big.dcm", gray).read_bytes(), 32, "big.dcm", max_pixels=100)
    with pytest.raises(DataError, match="not a readable DICOM"):
        decode_bytes(b"not a dicom at all", 32, name="fake.dcm")
    # a JPEG named .dcm is decoded as the JPEG it is, everywhere (extract, evaluate and predict share this)
    np.testing.assert_array_equal(decode_bytes(source.read_bytes(), 32, name="misnamed.dcm"), load_image(source, 32))


def test_extract_reads_dicom_with_the_features_of_the_jpeg_and_skips_bad_ones(dev_data, tmp_path, extract_config):
    """A label-file data set holding JPEGs and DICOM twins of some of them: the twins' cached features equal
    the JPEGs'; the DICOM PatientID groups the twin with its JPEG; a DICOM without pixels is skipped by name."""
    import h5py

    from featcache.extract import extract_features, format_summary

    root, rows = tmp_path / "data", []
    for split, count in (("train", 3), ("test", 2)):
        for label, name in enumerate(("NORMAL", "PNEUMONIA")):
            for i, source in enumerate(gray_sources(dev_data, split, name, count)):
                patient = f"{split}{name}{i}"
                relative = f"{split}/{name}/{source.name}"
                (root / relative).parent.mkdir(parents=True, exist_ok=True)
                (root / relative).write_bytes(source.read_bytes())
                rows.append({"path": relative, "finding": name, "split": "" if split == "train" else "test",
                             "patient": patient})
                if i == 0:  # the twins' patient comes from their PatientID tag
                    twins = dicom_variants(source, root / "dicom" / patient, patient=patient)
                    for variant, path in twins.items():
                        rows.append({"path": path.relative_to(root).as_posix(), "finding": name,
                                     "split": rows[-1]["split"], "patient": ""})
    write_dicom(root / "dicom" / "empty.dcm", np.zeros((4, 4), np.uint8), pixel_data=False, patient="E")
    rows.append({"path": "dicom/empty.dcm", "finding": "NORMAL", "split": "", "patient": ""})
    csv_path = write_csv(tmp_path / "labels.csv", rows)
    # one image per backbone call: CPU convolutions are not bitwise the same at every position of a batch
    config = extract_config(root, labels=csv_path, augment_copies=0, image_size=32, batch_size=1)
    summary = extract_features(config)[0]
    assert [s["path"] for s in summary.skipped] == ["dicom/empty.dcm"]
    assert "dicom/empty.dcm: " in format_summary(summary) and "without pixel data" in format_summary(summary)
    with h5py.File(summary.cache_path, "r") as handle:
        paths = [p.decode() for p in handle["files/path"][:]]
        patients = [p.decode() for p in handle["files/patient"][:]]
        pooled = handle["pooled"][:][np.argsort(handle["source_index"][:])]
    by_path = dict(zip(paths, pooled))
    twins = [(path, patient) for path, patient in zip(paths, patients) if path.startswith("dicom/")]
    assert len(twins) == 12  # 4 twin patients x 3 encodings
    for path, patient in twins:
        assert patient == path.split("/")[1]
        source = next(p for p, q in zip(paths, patients) if q == patient and not p.startswith("dicom/"))
        np.testing.assert_array_equal(by_path[path], by_path[source])
    assert len(paths) == 10 + 12 and len(set(patients)) == 10


def test_predict_takes_dicom_through_the_same_conversion(tmp_path_factory, dev_data, tmp_path):
    """The exported model on a DICOM twin gives the JPEG's probability (the SavedModel itself takes JPEG/PNG)."""
    import json

    from pipeline import dev_pipeline, run_cli

    run = dev_pipeline(tmp_path_factory, dev_data)
    source = gray_sources(dev_data, "test", "PNEUMONIA", 1)[0]
    twins = dicom_variants(source, tmp_path / "in")
    (tmp_path / "in" / source.name).write_bytes(source.read_bytes())
    result = run_cli("predict", "--no-progress", "--json", "--batch-size", "1", tmp_path / "in",
                     twins["window_16bit"], "--model", run["model"])
    assert result.exit_code == 0, result.output
    found = {p["path"].split("/")[-1]: p["probability"] for p in json.loads(result.stdout)["predictions"]}
    assert sorted(found) == sorted([source.name, "mono1.dcm", "mono2.dcm", "window16"])
    assert len(set(found.values())) == 1, found


@pytest.mark.parametrize("syntax, plugin", [("RLELossless", None), ("JPEG2000Lossless", "openjpeg")])
def test_compressed_transfer_syntaxes_decode_losslessly(source, tmp_path, syntax, plugin):
    """RLE Lossless with pydicom alone; JPEG 2000 Lossless with the [dicom] extra (pylibjpeg-openjpeg)."""
    import pydicom
    import pydicom.uid

    if plugin:
        pytest.importorskip(plugin)
    ds = pydicom.dcmread(write_dicom(tmp_path / "plain.dcm", jpeg_gray(source)))
    ds.compress(getattr(pydicom.uid, syntax))
    ds.save_as(tmp_path / "compressed.dcm")
    assert pydicom.dcmread(tmp_path / "compressed.dcm").file_meta.TransferSyntaxUID == getattr(pydicom.uid, syntax)
    np.testing.assert_array_equal(load_image(tmp_path / "compressed.dcm", 48), load_image(source, 48))
