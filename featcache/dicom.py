"""DICOM files to 8-bit gray pixels: the one conversion extract, evaluate and predict share.

Stored values -> modality LUT (rescale slope/intercept) -> VOI LUT or window centre/width when the file
has one -> linearly onto 0..255 from the output range of that step (else the full range of the stored
bits) -> MONOCHROME1 inverted, so bone is bright as in MONOCHROME2. pydicom does the LUT arithmetic;
compressed transfer syntaxes need its pixel-data plugins (``pip install featcache[dicom]``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from featcache.errors import DataError, ImageTooLargeError

DICOM_SUFFIX = ".dcm"
PREAMBLE_END = 132  # 128 bytes of preamble, then the magic b"DICM"

# Recorded in the fingerprint of caches that hold DICOM files; bump when the pixels change.
DICOM_CONVERSION = {
    "version": 1,
    "steps": "pydicom apply_modality_lut; apply_voi_lut (VOI LUT, else window centre/width, index 0) when "
             "present; linear map of that step's output range (else the stored bits' range through the "
             "rescale) onto 0..255, rounded; MONOCHROME1 inverted; gray repeated to RGB; first frame refused "
             "for multi-frame files",
}


def is_dicom_bytes(head: bytes) -> bool:
    """True when ``head`` (at least the first 132 bytes of a file) carries the DICOM preamble magic."""
    return head[128:PREAMBLE_END] == b"DICM"


def is_dicom_file(path: str | Path) -> bool:
    """A ``.dcm`` name, or a file that starts with the DICOM preamble (only 132 bytes are read)."""
    path = Path(path)
    if path.suffix.lower() == DICOM_SUFFIX:
        return True
    try:
        with open(path, "rb") as handle:
            return is_dicom_bytes(handle.read(PREAMBLE_END))
    except OSError:
        return False


def dicom_patient_id(path: str | Path) -> str | None:
    """The PatientID tag of a DICOM file (header only, pixel data not read), or None when absent or unreadable."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:  # noqa: BLE001 - an unreadable header is reported when the pixels are decoded
        return None
    value = str(ds.get("PatientID", "") or "").strip()
    return value or None


def dicom_to_gray(encoded: bytes, name: str = "image", max_pixels: int | None = None) -> np.ndarray:
    """The pixels of a DICOM file as (h, w, c) uint8, converted as the module says: c = 1 for a gray image
    (MONOCHROME1/2; repeated to three channels after the resize, as ``decode.decode_and_resize`` does), c = 3 RGB.

    Raises:
        ImageTooLargeError: more than ``max_pixels`` pixels by the header (nothing decoded).
        DataError: not a DICOM file, no pixel data, several frames, an unsupported photometric
            interpretation or a transfer syntax no installed pixel-data handler decodes.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(encoded), force=not is_dicom_bytes(encoded[:PREAMBLE_END]))
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on a damaged file
        raise DataError(f"{name} is not a readable DICOM file: {_first_line(exc)}") from None
    if "PixelData" not in ds and "Rows" not in ds and not is_dicom_bytes(encoded[:PREAMBLE_END]):
        raise DataError(f"{name} is not a readable DICOM file: no DICOM preamble and no image tags")
    if "PixelData" not in ds:
        raise DataError(f"{name} is a DICOM file without pixel data (PixelData tag missing)")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if max_pixels is not None and rows * columns > max_pixels:
        raise ImageTooLargeError(f"{name} is {columns} x {rows} = {rows * columns:,} pixels, over the limit of "
                                 f"{max_pixels:,} (raise it with --max-pixels)", pixels=rows * columns)
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise DataError(f"{name} is a multi-frame DICOM ({ds.NumberOfFrames} frames); featcache reads one image "
                        f"per file")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    try:
        stored = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - missing handler (NotImplementedError/RuntimeError) or bad data
        syntax = getattr(ds.file_meta, "TransferSyntaxUID", None) if hasattr(ds, "file_meta") else None
        label = f"{syntax.name} ({syntax})" if syntax is not None else "unknown"
        raise DataError(f"{name}: DICOM pixel data cannot be decoded (transfer syntax {label}); compressed "
                        f"syntaxes need 'pip install featcache[dicom]': {_first_line(exc)}") from None
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") and stored.ndim == 3 and stored.dtype == np.uint8:
        return np.ascontiguousarray(stored)  # pydicom already converted YBR to RGB
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or stored.ndim != 2:
        raise DataError(f"{name}: DICOM photometric interpretation {photometric} with shape {stored.shape} is not "
                        f"supported; expected a single-frame MONOCHROME1/MONOCHROME2 or 8-bit RGB image")
    gray = _to_uint8(stored, ds, name)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return gray[:, :, None]


def _to_uint8(stored: np.ndarray, ds, name: str) -> np.ndarray:
    """Modality LUT, VOI LUT or window, then the output range onto 0..255 (rounded)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        values = apply_modality_lut(stored, ds)
        low, high = _output_range(ds)
        if ds.get("VOILUTSequence") or "WindowCenter" in ds:
            values = apply_voi_lut(values, ds, index=0)
            low, high = _voi_range(ds, low, high)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        raise DataError(f"{name}: DICOM LUT or window values cannot be applied: {_first_line(exc)}") from None
    if not high > low:
        raise DataError(f"{name}: DICOM output range is empty ({low} .. {high}); check BitsStored and the window")
    scaled = (np.asarray(values, np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _output_range(ds) -> tuple[float, float]:
    """The range of the modality LUT's output: the stored bits' range through the rescale (as pydicom's
    ``apply_windowing`` defines its output range), or the modality LUT's own bit depth."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    signed = int(ds.get("PixelRepresentation", 0)) != 0
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = sorted((low * float(slope) + float(intercept), high * float(slope) + float(intercept)))
    return float(low), float(high)


def _voi_range(ds, low: float, high: float) -> tuple[float, float]:
    """A VOI LUT's output is 0 .. 2**bits - 1 of its descriptor; a window keeps the modality range."""
    if ds.get("VOILUTSequence"):
        return 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    return low, high


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
