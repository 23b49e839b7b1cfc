"""DICOM pixels as a radiologist sees them: modality LUT, VOI LUT or window, MONOCHROME1, one frame.

pydicom is an optional dependency (`pip install "medmoe[dicom]"`), imported only when a DICOM input arrives.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

DICOM_MAGIC_OFFSET = 128  # a DICOM file is a 128-byte preamble, then b"DICM"
CODEC_PACKAGES = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or: pip install python-gdcm)"


@dataclass
class DicomPixels:
    """One frame of a DICOM image.

    values: [H, W] float32 after the modality LUT (rescale slope/intercept: CT in Hounsfield units), or
        [H, W, 3] for colour images as stored.
    window: (centre, width) the file recommends, if any. voi_lut_unit: [H, W] in [0, 1] when the file has a
        VOI LUT sequence (it replaces the window). inverted: MONOCHROME1 (high values display dark).
    """

    values: torch.Tensor
    window: tuple[float, float] | None
    voi_lut_unit: torch.Tensor | None
    inverted: bool
    color: bool


def is_dicom_dataset(image) -> bool:
    return type(image).__module__.startswith("pydicom.") and hasattr(image, "pixel_array")


def is_dicom_file(path: str | os.PathLike) -> bool:
    with open(path, "rb") as handle:
        handle.seek(DICOM_MAGIC_OFFSET)
        return handle.read(4) == b"DICM"


def is_dicom_bytes(data) -> bool:
    """The bytes of a DICOM file (the "DICM" marker after the 128-byte preamble)?"""
    return isinstance(data, (bytes, bytearray)) and bytes(data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4]) == b"DICM"


def is_dicom(source) -> bool:
    """A pydicom Dataset, DICOM file bytes, or the path of a DICOM file?"""
    if isinstance(source, (str, os.PathLike)):
        return os.path.isfile(source) and is_dicom_file(source)
    return is_dicom_dataset(source) or is_dicom_bytes(source)


def read_dicom(source, frame: int | None = None) -> DicomPixels:
    """A DICOM file path, the file's bytes or a pydicom Dataset -> `DicomPixels` of frame `frame` (default: the
    middle frame)."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as error:
        raise ImportError(
            'Reading DICOM needs pydicom: pip install "medmoe[dicom]" (or pip install pydicom).'
        ) from error

    if is_dicom_dataset(source):
        dataset = source
    else:
        try:
            dataset = pydicom.dcmread(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        except (InvalidDicomError, EOFError, OSError) as error:
            raise ValueError(f"Cannot read this DICOM file: {error}") from error
    pixels = decoded_pixels(dataset)
    frames = int(dataset.get("NumberOfFrames") or 1)
    if frames > 1:
        index = frames // 2 if frame is None else frame
        if not -frames <= index < frames:
            raise ValueError(f"frame={frame} is out of range: this DICOM has {frames} frames.")
        pixels = pixels[index]
    elif frame not in (None, 0, -1):
        raise ValueError(f"frame={frame} is out of range: this DICOM has one frame.")
    if int(dataset.get("SamplesPerPixel") or 1) > 1:
        return DicomPixels(torch.as_tensor(pixels), None, None, inverted=False, color=True)

    calibrated = apply_modality_lut(pixels, dataset)
    voi_lut_unit = None
    if "VOILUTSequence" in dataset:
        bits = int(dataset.VOILUTSequence[0].LUTDescriptor[2])
        lut_input = calibrated.round().astype("int64") if (calibrated == calibrated.round()).all() else calibrated
        voi_lut_unit = torch.as_tensor(apply_voi_lut(lut_input, dataset), dtype=torch.float32) / (2**bits - 1)
    return DicomPixels(
        torch.as_tensor(calibrated, dtype=torch.float32),
        recommended_window(dataset),
        voi_lut_unit,
        inverted=dataset.get("PhotometricInterpretation") == "MONOCHROME1",
        color=False,
    )


def decoded_pixels(dataset):
    """`dataset.pixel_array`, with a clear error when its compression needs a codec that is not installed."""
    syntax = dataset.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in getattr(dataset, "file_meta", {}) else None
    try:
        return dataset.pixel_array
    except (RuntimeError, NotImplementedError) as error:
        if syntax is not None and syntax.is_compressed:
            reason = str(error).splitlines()[0]
            raise ValueError(
                f"Cannot decode this DICOM's pixel data, compressed as {syntax.name!r}: {reason} "
                f"Install a decoder: {CODEC_PACKAGES}."
            ) from error
        raise ValueError(f"Cannot decode this DICOM's pixel data: {error}") from error
    except (AttributeError, ValueError) as error:
        raise ValueError(f"Cannot read this DICOM's pixel data: {error}") from error


def recommended_window(dataset) -> tuple[float, float] | None:
    """The first (centre, width) of the file's Window Center / Window Width, if both are there."""
    centre, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if centre is None or width is None:
        return None
    return first_value(centre), first_value(width)


def first_value(value) -> float:
    """A DICOM number that may hold several values (a MultiValue): the first one is the default."""
    return float(value[0]) if isinstance(value, Sequence) else float(value)
