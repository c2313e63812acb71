"""Builders of non-Kermany data sets from the dev X-rays, under a test's tmp_path: a CheXpert-like nested
tree with a CSV label file, MIMIC-like names, and DICOM files written with pydicom from the dev JPEGs."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np


def gray_sources(dev_data: Path, split: str, name: str, count: int) -> list[Path]:
    """The first ``count`` dev JPEGs of ``split/name`` that decode to gray (three equal channels)."""
    import tensorflow as tf

    found = []
    for path in sorted((dev_data / split / name).iterdir()):
        rgb = tf.io.decode_jpeg(path.read_bytes(), channels=3, dct_method="INTEGER_ACCURATE").numpy()
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
            found.append(path)
        if len(found) == count:
            return found
    raise AssertionError(f"only {len(found)} gray JPEGs in {split}/{name}")


def jpeg_gray(path: Path) -> np.ndarray:
    """(h, w) uint8: the pixels featcache decodes from a gray JPEG (its first channel)."""
    import tensorflow as tf

    return tf.io.decode_jpeg(Path(path).read_bytes(), channels=3, dct_method="INTEGER_ACCURATE").numpy()[..., 0]


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 8,
                patient: str | None = "P1", pixel_data: bool = True, syntax=None, **tags) -> Path:
    """A single-frame DICOM file with ``pixels`` as stored values (uint8 for 8 bits, else uint16)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if patient is not None:
        ds.PatientID = patient
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (3 if pixels.ndim == 3 else 1), photometric
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0  # R, G, B interleaved per pixel
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (8 if bits == 8 else 16), bits, bits - 1, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    if pixel_data:
        ds.PixelData = pixels.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    if syntax is not None:
        ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\x00\xe0\x04\x00\x00\x00abcd" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return path


def dicom_variants(source: Path, folder: Path, patient: str = "P1") -> dict[str, Path]:
    """Three lossless DICOM encodings of a gray JPEG's pixels: 8-bit MONOCHROME2, MONOCHROME1 (inverted
    stored values) and 12-bit-in-16 with rescale and a window that maps the values back onto 0..255."""
    gray = jpeg_gray(source)
    return {
        "mono2_8bit": write_dicom(folder / "mono2.dcm", gray, patient=patient),
        "mono1_inverted": write_dicom(folder / "mono1.dcm", 255 - gray, "MONOCHROME1", patient=patient),
        # stored 8 g + 1000 (12 of 16 bits); rescale 2x - 500 gives 16 g + 1500; the LINEAR window
        # [1500, 1500 + 255 * 16] (centre 3540.5, width 4081) maps that exactly onto g. No .dcm name: the
        # preamble alone makes it DICOM.
        "window_16bit": write_dicom(folder / "window16", gray.astype(np.uint16) * 8 + 1000, bits=12,
                                    patient=patient, RescaleSlope=2, RescaleIntercept=-500, WindowCenter=3540.5,
                                    WindowWidth=4081),
    }


def chexpert_tree(dev_data: Path, root: Path, train_patients: int = 8, test_patients: int = 2) -> Path:
    """``CheXpert-v1.0-small/{train,valid}/patientNNNNN/study1/view{1_frontal,2_lateral}.jpg`` with a CSV
    ``labels.csv`` (path, Sex, Pneumonia, Edema, split). Per class, ``train_patients`` train patients (split
    blank) and ``test_patients`` valid patients (split test), two images each from one dev class; Pneumonia is
    the dev class, with one uncertain (-1) and one blank among the train rows; Edema is 0/1/-1/blank noise.

    Returns the path of the CSV (paths in it are relative to ``root``).
    """
    rows, number = [], 0
    for split, folder, per_class in (("train", "train", train_patients), ("test", "valid", test_patients)):
        for label, name in enumerate(("NORMAL", "PNEUMONIA")):
            sources = sorted((dev_data / split / name).iterdir())[:2 * per_class]
            for i in range(per_class):
                number += 1
                for view, source in zip(("view1_frontal", "view2_lateral"), sources[2 * i:2 * i + 2]):
                    relative = f"CheXpert-v1.0-small/{folder}/patient{number:05d}/study1/{view}.jpg"
                    (root / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, root / relative)
                    edema = ("1", "0", "-1", "")[len(rows) % 4]
                    rows.append({"path": relative, "Sex": "", "Pneumonia": str(label), "Edema": edema,
                                 "split": "test" if split == "test" else ""})
    rows[0]["Pneumonia"], rows[3]["Pneumonia"] = "-1", ""  # uncertain and blank, train rows
    for row in rows:
        row["Sex"] = "Female" if int(row["path"].split("patient")[1][:5]) % 2 else "Male"
    csv_path = root / "labels.csv"
    write_csv(csv_path, rows)
    return csv_path


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
