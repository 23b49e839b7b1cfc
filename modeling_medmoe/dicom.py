# Copyright 2026 The MedMoE Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file except in compliance with
# the License. You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software distributed under the License is distributed on
# an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the
# specific language governing permissions and limitations under the License.
"""DICOM pixels as a radiologist sees them: modality LUT, VOI LUT or window, MONOCHROME1, one frame.

pydicom is an optional dependency (`pip install "medmoe[dicom]"`), imported only when a DICOM input arrives.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .limits import InputLimits, InputTooLarge

DICOM_MAGIC_OFFSET = 128  # a DICOM file is a 128-byte preamble, then b"DICM"
PIXEL_DATA_TAG = 0x7FE00010
HEADER_DEFER_BYTES = 4096  # header values larger than this are not read until used (the pixel data never is here)
HEADER_INFLATE_BYTES = 1 << 20  # of a deflated file, this much is inflated to read its header
CODEC_PACKAGES = (
    'pip install "medmoe[dicom]" (pylibjpeg with pylibjpeg-libjpeg, -openjpeg and -rle), or pip install python-gdcm'
)
DECODER_MODULES = ("pylibjpeg", "gdcm")


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


def read_dicom(source, frame: int | None = None, limits: InputLimits | None = None) -> DicomPixels:
    """A DICOM file path, the file's bytes or a pydicom Dataset -> `DicomPixels` of frame `frame` (default: the
    middle frame). The header is checked against `limits` (frame size, frames) before any pixel is decoded, and
    only the chosen frame is decoded."""
    limits = limits or InputLimits()
    try:
        import pydicom  # noqa: F401
    except ImportError as error:
        raise ImportError(
            'Reading DICOM needs pydicom: pip install "medmoe[dicom]" (or pip install pydicom).'
        ) from error

    dataset = source if is_dicom_dataset(source) else open_dicom(source, limits)
    try:
        return dicom_frame(dataset, frame, limits)
    except ValueError:  # our own messages (InputTooLarge, frame out of range, no decoder) stand as they are
        raise
    except Exception as error:  # pydicom parses elements when they are first read: a malformed one raises here
        raise ValueError(f"Cannot read this DICOM file: {type(error).__name__}: {error}") from error


def dicom_frame(dataset, frame: int | None, limits: InputLimits) -> DicomPixels:
    """`read_dicom`'s work on a parsed dataset: check its header, decode one frame, calibrate it."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    check_dicom_size(dataset, limits)
    frames = frame_count(dataset)
    index = frames // 2 if frame is None else frame
    if not -frames <= index < frames:
        count = f"{frames} frames" if frames > 1 else "one frame"
        raise ValueError(f"frame={frame} is out of range: this DICOM has {count}.")
    pixels = decoded_frame(dataset, index % frames)
    if not pixels.dtype.isnative:  # big-endian files decode to big-endian arrays, which torch cannot take
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
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


def open_dicom(source: bytes | str | os.PathLike, limits: InputLimits):
    """Parse a DICOM file (path or bytes) into a pydicom Dataset without decoding its pixel data; the file's size
    and its header's frame size and frame count are checked against `limits` first. A deflated file is inflated
    only as far as its header says it holds."""
    import pydicom

    size = len(source) if isinstance(source, (bytes, bytearray)) else os.path.getsize(source)
    limits.check("max_image_bytes", size, "The DICOM file's size in bytes")
    try:
        with _binary(source) as handle:
            pydicom.filereader.read_preamble(handle, True)
            file_meta = pydicom.filereader._read_file_meta_info(handle)
            if file_meta.get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian:
                return _inflate_within_limits(handle, file_meta, limits)  # dcmread would inflate it all first
            handle.seek(0)
            header = pydicom.dcmread(handle, stop_before_pixels=True, defer_size=HEADER_DEFER_BYTES, force=True)
            check_dicom_size(header, limits)
            handle.seek(0)
            return pydicom.dcmread(handle, force=True)
    except InputTooLarge:
        raise
    except Exception as error:  # pydicom raises many kinds of error on a malformed file: each is unreadable input
        raise ValueError(f"Cannot read this DICOM file: {type(error).__name__}: {error}") from error


def _binary(source: bytes | str | os.PathLike):
    return io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")


def frame_count(dataset) -> int:
    """Number of Frames, or 1 when absent. A value that is not a number (seen: "1A") is worked out from the size of
    uncompressed pixel data, and set on the dataset so that its decoder agrees; without pixel data to count, 1."""
    value = dataset.get("NumberOfFrames")
    try:
        return int(value or 1)
    except (TypeError, ValueError):
        pass
    rows, columns = int(dataset.get("Rows") or 0), int(dataset.get("Columns") or 0)
    frame_bytes = (
        rows * columns * int(dataset.get("SamplesPerPixel") or 1) * -(-int(dataset.get("BitsAllocated") or 8) // 8)
    )
    syntax = getattr(dataset, "file_meta", {}).get("TransferSyntaxUID")
    pixel_data = dataset.get("PixelData") if "PixelData" in dataset and not (syntax and syntax.is_compressed) else None
    if pixel_data is None or frame_bytes == 0 or len(pixel_data) % frame_bytes:
        return 1
    frames = len(pixel_data) // frame_bytes
    dataset.NumberOfFrames = str(frames)
    return frames


def check_dicom_size(dataset, limits: InputLimits) -> None:
    """Raise InputTooLarge when the header declares a frame or a frame count above `limits`."""
    rows, columns = int(dataset.get("Rows") or 0), int(dataset.get("Columns") or 0)
    limits.check("max_image_pixels", rows * columns, f"The DICOM frame's pixel count ({columns}x{rows})")
    limits.check("max_frames", frame_count(dataset), "The DICOM's number of frames")


def _declared_pixel_bytes(dataset) -> int:
    """Bytes the header says the (uncompressed) pixel data holds."""
    rows, columns = int(dataset.get("Rows") or 0), int(dataset.get("Columns") or 0)
    frames, samples = frame_count(dataset), int(dataset.get("SamplesPerPixel") or 1)
    return rows * columns * frames * samples * -(-int(dataset.get("BitsAllocated") or 8) // 8)


def _inflate_within_limits(handle, file_meta, limits: InputLimits):
    """The dataset after the file meta of a Deflated Explicit VR Little Endian file (`handle` is just past the file
    meta), inflated no further than its declared pixel data (plus the header's own size) after the header was
    checked; a file that inflates beyond that is refused."""
    import pydicom
    from pydicom.filereader import read_dataset

    compressed = handle.read()
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    head = inflater.decompress(compressed, HEADER_INFLATE_BYTES)
    is_pixel_data = lambda tag, vr, length: tag == PIXEL_DATA_TAG  # noqa: E731
    declared = read_dataset(io.BytesIO(head), False, True, stop_when=is_pixel_data, defer_size=HEADER_DEFER_BYTES)
    check_dicom_size(declared, limits)
    allowed = HEADER_INFLATE_BYTES + _declared_pixel_bytes(declared)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = inflater.decompress(compressed, allowed + 1)
    if len(inflated) > allowed or inflater.unconsumed_tail:
        raise InputTooLarge(f"This deflated DICOM inflates beyond the {allowed:,} bytes its header declares.")
    dataset = read_dataset(io.BytesIO(inflated), False, True)
    return pydicom.dataset.FileDataset(handle, dataset, None, file_meta, is_implicit_VR=False, is_little_endian=True)


def decoded_frame(dataset, index: int):
    """Frame `index` of the dataset's pixel data (only that frame is decoded), with a clear error when its
    compression needs a codec that is not installed."""
    from pydicom.pixels import pixel_array

    syntax = dataset.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in getattr(dataset, "file_meta", {}) else None
    try:
        return pixel_array(dataset, index=index)
    except (RuntimeError, NotImplementedError) as error:
        if syntax is not None and syntax.is_compressed:
            reason = " ".join(line.strip() for line in str(error).splitlines()[:2])
            hint = "" if decoders_installed() else f" Install a decoder: {CODEC_PACKAGES}."
            raise ValueError(
                f"Cannot decode this DICOM's pixel data, compressed as {syntax.name!r}: {reason}{hint}"
            ) from error
        raise ValueError(f"Cannot decode this DICOM's pixel data: {error}") from error
    except (AttributeError, ValueError, KeyError, TypeError, IndexError) as error:
        raise ValueError(f"Cannot read this DICOM's pixel data: {error}") from error


def decoders_installed() -> bool:
    """pylibjpeg or GDCM, pydicom's decoders for compressed transfer syntaxes, can be imported."""
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in DECODER_MODULES)


def recommended_window(dataset) -> tuple[float, float] | None:
    """The first (centre, width) of the file's Window Center / Window Width, if both are there."""
    centre, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if centre is None or width is None:
        return None
    return first_value(centre), first_value(width)


def first_value(value) -> float:
    """A DICOM number that may hold several values (a MultiValue): the first one is the default."""
    return float(value[0]) if isinstance(value, Sequence) else float(value)
