# Copyright 2026 The MedMoE Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file except in compliance with
# the License. You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software distributed under the License is distributed on
# an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the
# specific language governing permissions and limitations under the License.
"""The image side of a MedMoE model as one callable, in PyTorch or on its folder's ONNX export: what the zero-shot
pipeline, the endpoint handler, the evaluation and the archive tools embed images with."""

import contextlib

import torch

from .onnx_image_encoder import OnnxImageEncoder, exported_encoder

BACKENDS = ("auto", "torch", "onnx")


class ImageEncoder:
    """pixel_values [B, 3, H, W] -> (image embeddings [B, P], not normalised, as `get_image_features`' pooler
    output; the chosen expert of each image [B]), returned on the CPU in float32.

    Build it with `ImageEncoder.for_model(model, folder, backend)`: "torch" runs the model's image side, "onnx" the
    folder's ONNX export (`modeling_medmoe.onnx_export`), "auto" the export when the folder holds one and onnxruntime
    is installed, else the model. `name` says which runs ("torch", "onnx-fp32" or "onnx-int8").
    """

    def __init__(self, model, onnx: OnnxImageEncoder | None = None, autocast_dtype: torch.dtype | None = None):
        self.model, self.onnx, self.autocast_dtype = model, onnx, autocast_dtype

    @classmethod
    def for_model(
        cls, model, folder: str | None = None, backend: str = "auto", autocast_dtype: torch.dtype | None = None
    ) -> "ImageEncoder":
        """The encoder of `model`, whose saved folder (default: the one it was loaded from) may hold an export. With
        `autocast_dtype` (torch.bfloat16 or torch.float16) the model's image side runs under autocast on its device;
        the ONNX export keeps its own precision."""
        if backend not in BACKENDS:
            raise ValueError(f"Unknown backend {backend!r}; use one of {', '.join(BACKENDS)}.")
        folder = folder or model.name_or_path
        if backend == "onnx":
            return cls(model, OnnxImageEncoder(folder))
        return cls(model, exported_encoder(folder) if backend == "auto" and folder else None, autocast_dtype)

    @property
    def name(self) -> str:
        return f"onnx-{self.onnx.precision}" if self.onnx is not None else "torch"

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.onnx is not None:
            return self.onnx(pixel_values)
        parameter = next(self.model.parameters())
        if parameter.device.type == "cuda":
            pixel_values = pixel_values.pin_memory()  # the copy to the GPU then overlaps with the host's work
        pixel_values = pixel_values.to(parameter.device, parameter.dtype, non_blocking=True)
        autocast = (
            torch.autocast(parameter.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            image = self.model.vision_model(pixel_values)
        return image.image_embeds.float().cpu(), image.expert_index.cpu()
