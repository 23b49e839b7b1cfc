# Copyright 2026 The MedMoE Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file except in compliance with
# the License. You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software distributed under the License is distributed on
# an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the
# specific language governing permissions and limitations under the License.
"""MedMoE image processor: medical images as they come (DICOM, PIL, 8/16-bit or float arrays, tensors) -> pixel_values.

Imports only torch and transformers: PIL images and numpy arrays are read through their buffers, Pillow is
imported to open an image file path, pydicom (optional) when a DICOM arrives.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from typing import TypedDict

import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .dicom import DicomPixels, is_dicom_bytes, is_dicom_dataset, is_dicom_file, read_dicom
from .limits import InputLimits, InputTooLarge

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ACCEPTED_INPUTS = (
    "a PIL image, a numpy array or torch tensor shaped HxW, HxWxC or CxHxW with C in (1, 3, 4), a pydicom Dataset, "
    "an image or DICOM file path, the bytes of an image or DICOM file, or a list of these"
)
WINDOW_PRESETS = {  # (centre, width) in Hounsfield units: the usual CT display windows
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
}
PIL_RAW_MODES = {"I;16": torch.int16, "I": torch.int32, "F": torch.float32}  # 16-bit read as int32 below


def resolve_window(window: str | Sequence[float] | None) -> tuple[float, float] | None:
    """A preset name (WINDOW_PRESETS), (centre, width), or "centre,width" as a command line or form gives it
    -> (centre, width); None stays None."""
    if window is None:
        return None
    if isinstance(window, str) and "," in window:
        window = window.split(",")
    elif isinstance(window, str):
        if window not in WINDOW_PRESETS:
            raise ValueError(f"Unknown window {window!r}; use one of {sorted(WINDOW_PRESETS)} or (centre, width).")
        return WINDOW_PRESETS[window]
    centre, width = (float(value) for value in window)
    if not width > 0 or not math.isfinite(centre) or not math.isfinite(width):
        raise ValueError(f"The window width must be positive and both numbers finite, got ({centre}, {width}).")
    return centre, width


def apply_window(values: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    """Linear window: centre - width/2 -> 0, centre + width/2 -> 1, clipped."""
    centre, width = window
    return ((values.float() - (centre - width / 2)) / width).clamp(0.0, 1.0)


def percentile_normalise(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Map the [low, high] percentiles of `values` to [0, 1], clipping outside; a constant image maps to 0."""
    flat = values.reshape(-1).float()
    lower, upper = (flat.kthvalue(1 + round(q / 100 * (flat.numel() - 1))).values for q in (low, high))
    if upper <= lower:
        return torch.zeros_like(values, dtype=torch.float32)
    return ((values.float() - lower) / (upper - lower)).clamp(0.0, 1.0)


def is_pil_image(image) -> bool:
    return type(image).__module__.startswith("PIL.") and hasattr(image, "getbands")


def pil_to_tensor(image) -> torch.Tensor:
    """PIL image -> [H, W, C] tensor: 8-bit modes as uint8 (palette, CMYK, LA, 1-bit, ... via RGB or L), 16-bit,
    32-bit integer and float modes with their values."""
    if image.mode in ("I;16B", "I;16L", "I;16N"):
        image = image.convert("I")
    if image.mode in PIL_RAW_MODES:
        raw = torch.frombuffer(bytearray(image.tobytes()), dtype=PIL_RAW_MODES[image.mode])
        values = raw.to(torch.int32) & 0xFFFF if image.mode == "I;16" else raw  # I;16 is unsigned
        return values.reshape(image.height, image.width, 1)
    if image.mode not in ("RGB", "L"):
        image = image.convert("L" if image.mode in ("LA", "1", "La") else "RGB")
    channels = len(image.getbands())
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, channels)


class MedMoEImagesKwargs(TypedDict, total=False):
    """What one call of the image processor (or the processor's `images_kwargs`) may set; each defaults to the
    processor's own attribute of that name."""

    size: dict[str, int]
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: list[float] | tuple[float, ...]
    image_std: list[float] | tuple[float, ...]
    window: str | list[float] | tuple[float, float] | None
    frame: int | None
    return_tensors: str | None


class MedMoEImageProcessor(BaseImageProcessor):
    """Turns images into `pixel_values` [batch, 3, height, width] for `MedMoEModel`.

    Steps: convert to float in [0, 1]: uint8 times `rescale_factor` (1/255) unless `do_rescale` is False; DICOM
    through its modality LUT (rescale slope/intercept),
    then `window` if given, else the file's VOI LUT or window centre/width, else the percentile window, and
    MONOCHROME1 inverted; other integer and float data through `window` if given, else unchanged when already in
    [0, 1], else the percentile window. Then grayscale to 3 channels, alpha dropped; resize the shorter side to
    fit, center crop to `size`; normalise with `image_mean` / `image_std` unless `do_normalize` is False.

    Args:
        size: {"height": h, "width": w} of the output.
        do_rescale, rescale_factor: 8-bit pixels are multiplied by `rescale_factor` (default 1/255) when
            `do_rescale`; other data is mapped by its window (below).
        do_normalize, image_mean, image_std: per-channel normalisation.
        percentiles: (low, high) percentiles mapped to 0 and 1 for data that is not 8-bit and has no window.
        window: None, a preset name (lung, mediastinum, bone, brain, abdomen: CT windows in Hounsfield units) or
            (centre, width) in the data's units (after the DICOM modality LUT).
        frame: the frame of a multi-frame DICOM (default: the middle one).
        input_limits: `InputLimits` fields to change (pixels per image or frame, frames, file bytes, ...); images
            above them are refused before decoding (`InputTooLarge`). Saved with the processor.
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = MedMoEImagesKwargs

    def __init__(
        self,
        size: dict[str, int] | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        percentiles: Sequence[float] = (0.5, 99.5),
        window: str | Sequence[float] | None = None,
        frame: int | None = None,
        input_limits: dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.input_limits = InputLimits.from_dict(input_limits).to_dict()
        resolve_window(window)  # fail early on a bad window
        self.size = dict(size or {"height": 224, "width": 224})
        self.do_rescale, self.rescale_factor, self.do_normalize = do_rescale, rescale_factor, do_normalize
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.percentiles = list(percentiles)
        self.window = window if window is None or isinstance(window, str) else list(window)
        self.frame = frame

    @property
    def limits(self) -> InputLimits:
        return InputLimits.from_dict(self.input_limits)

    def preprocess(self, images, **kwargs) -> BatchFeature:
        """images: one image or a list (see ACCEPTED_INPUTS). Keyword arguments (`MedMoEImagesKwargs`: size,
        do_rescale, rescale_factor, do_normalize, image_mean, image_std, window, frame) override the processor's
        settings for this call; return_tensors is "pt" (default) or None. Returns BatchFeature with `pixel_values`."""
        unknown = sorted(set(kwargs) - set(MedMoEImagesKwargs.__annotations__))
        if unknown:
            accepted = sorted(MedMoEImagesKwargs.__annotations__)
            raise TypeError(f"MedMoEImageProcessor got unexpected arguments {unknown}; it takes {accepted}.")
        return_tensors = kwargs.pop("return_tensors", "pt")
        if return_tensors not in ("pt", None):
            raise ValueError(f"MedMoEImageProcessor returns torch tensors; got return_tensors={return_tensors!r}.")
        settings = self.with_settings(**kwargs)
        window = resolve_window(settings.window)
        batch = [settings.to_model_input(image, window, settings.frame) for image in self._as_list(images)]
        return BatchFeature(data={"pixel_values": torch.stack(batch)}, tensor_type=return_tensors)

    def with_settings(self, **settings) -> "MedMoEImageProcessor":
        """A copy of this processor with the given settings (`MedMoEImagesKwargs`; None keeps this one's)."""
        changed = copy.copy(self)
        for name, value in settings.items():
            if value is not None:
                setattr(changed, name, list(value) if name in ("image_mean", "image_std", "window")
                        and not isinstance(value, str) else value)  # fmt: skip
        resolve_window(changed.window)
        return changed

    def _as_list(self, images) -> list:
        """The images as a flat list: one image, a list, or transformers' nested batch (a list of each sample's
        images, possibly none)."""
        if isinstance(images, (list, tuple)):
            flat = [image for item in images for image in (item if isinstance(item, (list, tuple)) else [item])]
            if not flat:
                raise ValueError(f"Got an empty list of images; expected {ACCEPTED_INPUTS}.")
            return flat
        if getattr(images, "ndim", None) == 4:
            if len(images) == 0:
                raise ValueError(f"Got an empty batch of images; expected {ACCEPTED_INPUTS}.")
            return list(images)
        return [images]

    def to_display(self, image, window: str | Sequence[float] | None = None, frame: int | None = None):
        """One image as a person should see it, before resizing: float tensor [3, H, W] in [0, 1] (DICOM through
        its window, as for the model). `window` and `frame` as in `preprocess`."""
        window = resolve_window(window if window is not None else self.window)
        return self.to_unit_range(image, window, frame if frame is not None else self.frame)

    def to_model_input(self, image, window: tuple[float, float] | None = None, frame: int | None = None):
        """One image -> normalised float tensor [3, height, width]."""
        return self.unit_to_model_input(self.to_unit_range(image, window, frame))

    def unit_to_model_input(self, unit: torch.Tensor) -> torch.Tensor:
        """[3, H, W] in [0, 1] (`to_unit_range`, `to_display`) -> [3, height, width], normalised when
        `do_normalize`."""
        resized = self.resize_and_crop(unit)
        if not self.do_normalize:
            return resized
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        return (resized - mean) / std

    def to_unit_range(self, image, window: tuple[float, float] | None = None, frame: int | None = None):
        """One image -> float tensor [3, H, W] in [0, 1]."""
        if isinstance(image, (str, os.PathLike)):
            image = self._open(image, frame)
        elif isinstance(image, (bytes, bytearray)):
            image = read_dicom(image, frame, self.limits) if is_dicom_bytes(image) else self._decode(image)
        if is_dicom_dataset(image):
            image = read_dicom(image, frame, self.limits)
        if isinstance(image, DicomPixels):
            unit = self._dicom_to_unit(image, window)
        else:
            unit = self._scale_to_unit(self._as_channels_last(image), window)
        channels = unit.shape[-1]
        if channels == 1:
            unit = unit.expand(*unit.shape[:2], 3)
        elif channels == 4:
            unit = unit[..., :3]
        return unit.permute(2, 0, 1).contiguous()

    def _open(self, path: str | os.PathLike, frame: int | None):
        if not os.path.isfile(path):  # also refuses FIFOs, sockets and devices, which could block a read
            raise FileNotFoundError(f"No image file at {path}.")
        if is_dicom_file(path):
            return read_dicom(path, frame, self.limits)
        with open(path, "rb") as handle:
            return self._decode(handle, name=str(path))

    def _decode(self, data, name: str | None = None):
        """The bytes of an image file (PNG, JPEG, TIFF ...) or an open file -> PIL image; its size is read from the
        header and checked against the limits before the pixels are decoded."""
        import io

        from PIL import Image

        what = name or f"these image bytes ({len(data)} bytes)"
        size = len(data) if isinstance(data, (bytes, bytearray)) else os.fstat(data.fileno()).st_size
        self.limits.check("max_image_bytes", size, f"The size in bytes of {what}")
        unreadable = (OSError, ValueError, SyntaxError, EOFError)  # UnidentifiedImageError is an OSError
        try:
            opened = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
        except Image.DecompressionBombError as error:  # Pillow's own guard, far above ours
            limit = self.limits.max_image_pixels
            raise InputTooLarge(
                f"The pixel count of {what} is above the limit max_image_pixels={limit:,} (Pillow: {error})"
            ) from error
        except unreadable as error:
            raise ValueError(f"Cannot decode {what}: {error}") from error
        with opened:
            self._check_pil_size(opened, what)
            try:
                opened.load()
            except unreadable as error:
                raise ValueError(f"Cannot decode {what}: {error}") from error
            return opened.copy()

    def _check_pil_size(self, image, what: str = "the image") -> None:
        """A PIL image's size, known from its header, against the limits (before its pixels are decoded)."""
        width, height = image.size
        self.limits.check("max_image_pixels", width * height, f"The pixel count of {what} ({width}x{height})")

    def _as_channels_last(self, image) -> torch.Tensor:
        """PIL image, array or tensor -> [H, W, C]; HxW, HxWxC and CxHxW (C in 1, 3, 4) accepted."""
        if is_pil_image(image):
            self._check_pil_size(image)
            return pil_to_tensor(image)
        if isinstance(image, torch.Tensor):
            tensor = image.detach().cpu()
        elif hasattr(image, "__array_interface__"):  # a numpy array, read without importing numpy here
            try:
                tensor = torch.as_tensor(image)
            except TypeError as error:
                raise ValueError(
                    f"Cannot read image data of dtype {image.dtype}; expected integer or float pixels."
                ) from error
        else:
            raise ValueError(f"Cannot read an image of type {type(image).__name__}; expected {ACCEPTED_INPUTS}.")
        if tensor.ndim == 2:
            return tensor[..., None]
        if tensor.ndim == 3:
            if tensor.shape[-1] in (1, 3, 4):
                return tensor
            if tensor.shape[0] in (1, 3, 4):
                return tensor.permute(1, 2, 0)
        raise ValueError(f"Cannot read an image array of shape {tuple(tensor.shape)}; expected {ACCEPTED_INPUTS}.")

    def _check(self, values: torch.Tensor) -> None:
        height, width = values.shape[:2]
        self.limits.check("max_image_pixels", height * width, f"The image's pixel count ({width}x{height})")
        if values.numel() == 0 or min(values.shape[:2]) == 0:
            raise ValueError(f"Got an empty image of shape {tuple(values.shape)}; expected {ACCEPTED_INPUTS}.")
        if values.is_complex():
            raise ValueError(f"Cannot read image data of dtype {values.dtype}; expected integer or float pixels.")
        if values.is_floating_point() and not torch.isfinite(values).all():
            raise ValueError("The image contains NaN or infinite values.")

    def _scale_to_unit(self, values: torch.Tensor, window: tuple[float, float] | None) -> torch.Tensor:
        """[H, W, C] of any dtype -> float32 in [0, 1]."""
        self._check(values)
        if values.dtype == torch.uint8:
            return values.float() * self.rescale_factor if self.do_rescale else values.float()
        if values.dtype == torch.bool:
            return values.float()
        if values.dtype == torch.uint16:  # torch has few uint16 kernels
            values = values.to(torch.int32)
        if window is not None:
            return apply_window(values, window)
        if values.is_floating_point() and values.min() >= 0.0 and values.max() <= 1.0:
            return values.float()
        return percentile_normalise(values, *self.percentiles)

    def _dicom_to_unit(self, pixels: DicomPixels, window: tuple[float, float] | None) -> torch.Tensor:
        """DicomPixels -> [H, W, C] in [0, 1]: the explicit window, else the file's VOI LUT or window."""
        if pixels.color:
            return self._scale_to_unit(pixels.values, window)
        self._check(pixels.values)
        if window is not None:
            unit = apply_window(pixels.values, window)
        elif pixels.voi_lut_unit is not None:
            unit = pixels.voi_lut_unit.clamp(0.0, 1.0)
        elif pixels.window is not None:
            unit = apply_window(pixels.values, pixels.window)
        else:
            unit = percentile_normalise(pixels.values, *self.percentiles)
        return (1.0 - unit if pixels.inverted else unit)[..., None]

    def resize_and_crop(self, image: torch.Tensor) -> torch.Tensor:
        """[3, H, W] -> [3, height, width]: scale so the image covers the target, then center crop. The antialiased
        resize may overshoot: values are kept within [0, 1], or within the image's own range where that is wider
        (8-bit data with do_rescale=False)."""
        target_height, target_width = self.size["height"], self.size["width"]
        height, width = image.shape[-2:]
        scale = max(target_height / height, target_width / width)
        resized_height, resized_width = (
            max(target_height, round(height * scale)),
            max(target_width, round(width * scale)),
        )
        resized = F.interpolate(
            image[None], size=(resized_height, resized_width), mode="bilinear", antialias=True, align_corners=False
        )[0]
        top, left = (resized_height - target_height) // 2, (resized_width - target_width) // 2
        lower, upper = min(0.0, float(image.min())), max(1.0, float(image.max()))
        return resized[:, top : top + target_height, left : left + target_width].clamp(lower, upper)


MedMoEImageProcessor.register_for_auto_class("AutoImageProcessor")
