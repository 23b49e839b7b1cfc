"""MedMoE image processor: medical images as they come (PIL, 8/16-bit or float arrays, tensors) -> pixel_values."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ACCEPTED_INPUTS = (
    "a PIL image, a numpy array or torch tensor shaped HxW, HxWxC or CxHxW with C in (1, 3, 4), or a list of these"
)


def percentile_normalise(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map the [low, high] percentiles of `values` to [0, 1], clipping outside; a constant image maps to 0."""
    lower, upper = np.percentile(values, [low, high])
    if upper <= lower:
        return np.zeros_like(values, dtype=np.float32)
    return np.clip((values - lower) / (upper - lower), 0.0, 1.0).astype(np.float32)


class MedMoEImageProcessor(BaseImageProcessor):
    """Turns images into `pixel_values` [batch, 3, height, width] for `MedMoEModel`.

    Steps: convert to float in [0, 1] (uint8 / 255; other integer and float data by percentile window unless
    already in [0, 1]); grayscale to 3 channels, alpha dropped; resize the shorter side to fit, then center crop
    to `size`; normalise with `image_mean` / `image_std`.

    Args:
        size: {"height": h, "width": w} of the output.
        image_mean, image_std: per-channel normalisation.
        percentiles: (low, high) percentiles mapped to 0 and 1 for data that is not 8-bit (16-bit, float, CT
            numbers).
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: dict[str, int] | None = None,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        percentiles: Sequence[float] = (0.5, 99.5),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.size = dict(size or {"height": 224, "width": 224})
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.percentiles = list(percentiles)

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """images: one image or a list (see ACCEPTED_INPUTS). Returns BatchFeature with `pixel_values`."""
        if kwargs:
            raise TypeError(f"MedMoEImageProcessor got unexpected arguments {sorted(kwargs)}.")
        batch = [self.to_model_input(image) for image in self._as_list(images)]
        pixel_values = torch.stack(batch)
        if return_tensors not in ("pt", None):
            raise ValueError(f"MedMoEImageProcessor returns torch tensors; got return_tensors={return_tensors!r}.")
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def _as_list(self, images) -> list:
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError(f"Got an empty list of images; expected {ACCEPTED_INPUTS}.")
            return list(images)
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            return list(images)
        return [images]

    def to_model_input(self, image) -> torch.Tensor:
        """One image -> normalised float tensor [3, height, width]."""
        unit = self.to_unit_range(image)  # [channels, H, W] in [0, 1]
        resized = self.resize_and_crop(unit)
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        return (resized - mean) / std

    def to_unit_range(self, image) -> torch.Tensor:
        """One image -> float tensor [3, H, W] in [0, 1]."""
        if isinstance(image, Image.Image):
            array = self._pil_to_array(image)
        elif isinstance(image, torch.Tensor):
            array = self._channels_last(
                image.detach().cpu().float().numpy() if image.is_floating_point() else image.detach().cpu().numpy()
            )
        elif isinstance(image, np.ndarray):
            array = self._channels_last(image)
        else:
            raise ValueError(f"Cannot read an image of type {type(image).__name__}; expected {ACCEPTED_INPUTS}.")
        unit = self._scale_to_unit(array)
        channels = unit.shape[-1]
        if channels == 1:
            unit = np.repeat(unit, 3, axis=-1)
        elif channels == 4:
            unit = unit[..., :3]
        return torch.from_numpy(np.ascontiguousarray(unit)).permute(2, 0, 1)

    def _pil_to_array(self, image: Image.Image) -> np.ndarray:
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return np.asarray(image)[..., None]
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        array = np.asarray(image)
        return array[..., None] if array.ndim == 2 else array

    def _channels_last(self, array: np.ndarray) -> np.ndarray:
        """HxW, HxWxC or CxHxW (C in 1, 3, 4) -> HxWxC."""
        if array.ndim == 2:
            return array[..., None]
        if array.ndim == 3:
            if array.shape[-1] in (1, 3, 4):
                return array
            if array.shape[0] in (1, 3, 4):
                return np.moveaxis(array, 0, -1)
        raise ValueError(f"Cannot read an image array of shape {tuple(array.shape)}; expected {ACCEPTED_INPUTS}.")

    def _scale_to_unit(self, array: np.ndarray) -> np.ndarray:
        if array.size == 0 or min(array.shape[:2]) == 0:
            raise ValueError(f"Got an empty image of shape {tuple(array.shape)}; expected {ACCEPTED_INPUTS}.")
        if array.dtype == np.uint8:
            return array.astype(np.float32) / 255.0
        if array.dtype == np.bool_:
            return array.astype(np.float32)
        if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
            raise ValueError(f"Cannot read image data of dtype {array.dtype}; expected integer or float pixels.")
        if not np.isfinite(array).all():
            raise ValueError("The image contains NaN or infinite values.")
        if np.issubdtype(array.dtype, np.floating) and array.min() >= 0.0 and array.max() <= 1.0:
            return array.astype(np.float32)
        return percentile_normalise(array, *self.percentiles)

    def resize_and_crop(self, image: torch.Tensor) -> torch.Tensor:
        """[3, H, W] -> [3, height, width]: scale so the image covers the target, then center crop."""
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
        return resized[:, top : top + target_height, left : left + target_width].clamp(0.0, 1.0)


MedMoEImageProcessor.register_for_auto_class("AutoImageProcessor")
