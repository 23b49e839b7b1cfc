# Copyright 2026 The MedMoE Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file except in compliance with
# the License. You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software distributed under the License is distributed on
# an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the
# specific language governing permissions and limitations under the License.
"""The vision pyramid: a timm backbone built from config that returns 4 feature levels, finest first."""

from __future__ import annotations

import timm
import torch
from torch import nn
from transformers import initialization as init

from .configuration_medmoe import MedMoEVisionConfig

BACKBONE_LAYER = "medmoe_backbone_layer"  # marks the backbone's modules, which timm initialises
TIMM_LINEAR_STD = 0.02  # timm's transformers initialise their Linear layers with trunc_normal(std=0.02)


def create_backbone(
    config: MedMoEVisionConfig, pretrained: bool = False, pretrained_file: str | None = None
) -> nn.Module:
    """A timm `features_only` model for the config. The model builds it with `pretrained=False`; loading timm's
    weights (`pretrained=True`: from the Hub, or from `pretrained_file`, a local timm checkpoint of the whole
    model, through timm's `pretrained_cfg_overlay`) is the training script's job."""
    kwargs = {
        "pretrained": pretrained or pretrained_file is not None,
        "features_only": True,
        "out_indices": tuple(config.backbone_out_indices),
        "in_chans": config.num_channels,
        **(config.backbone_kwargs or {}),
    }
    if pretrained_file is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
    try:  # transformer backbones (Swin, ViT) fix their input size at construction
        return timm.create_model(config.backbone, img_size=config.image_size, **kwargs)
    except TypeError as error:  # convolutional backbones take any size and no `img_size` argument
        if "img_size" not in str(error):
            raise
        return timm.create_model(config.backbone, **kwargs)


def initialise_like_timm(module: nn.Module) -> None:
    """A backbone module's own parameters as timm initialises its transformers: Linear layers trunc_normal(std 0.02)
    with zero biases, Swin's relative position bias tables likewise, convolutions and norms with PyTorch's defaults.
    Only parameters that were not loaded change (transformers' init functions skip loaded ones)."""
    if isinstance(module, nn.Linear):
        init.trunc_normal_(module.weight, std=TIMM_LINEAR_STD)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, (nn.Conv2d, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
        module.reset_parameters()
    if isinstance(getattr(module, "relative_position_bias_table", None), nn.Parameter):
        init.trunc_normal_(module.relative_position_bias_table, std=TIMM_LINEAR_STD)


class VisionPyramid(nn.Module):
    """Runs the backbone and returns its 4 levels as channels-first maps.

    Input `pixel_values` [batch, channels, H, W]; output a list of 4 tensors [batch, C_l, H / s_l, W / s_l] with
    strides s_l increasing (4, 8, 16, 32 for Swin).
    """

    def __init__(self, config: MedMoEVisionConfig):
        super().__init__()
        self.backbone = create_backbone(config)
        self.channels_last_output = getattr(self.backbone, "output_fmt", "NCHW") == "NHWC"
        self.channels: list[int] = list(self.backbone.feature_info.channels())
        reductions = list(self.backbone.feature_info.reduction())
        if len(self.channels) != 4 or reductions != sorted(reductions):
            raise ValueError(
                f"timm model {config.backbone!r} with out_indices {tuple(config.backbone_out_indices)} gives feature "
                f"levels at strides {reductions}; MedMoE needs 4 levels, finest first. Set "
                "vision_config.backbone_out_indices to pick them."
            )
        self.reductions = reductions
        for module in self.backbone.modules():
            setattr(module, BACKBONE_LAYER, True)

    @property
    def gradient_checkpointing(self) -> bool:
        return bool(getattr(self, "_gradient_checkpointing", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        """Set by `PreTrainedModel.activation_checkpointing_enable` (with the experts and the text encoder's layers);
        forwards to timm's own switch, which checkpoints each stage of the backbone (timm's non-reentrant
        checkpoint: the checkpointing kwargs of transformers apply to the experts and the text encoder)."""
        self._gradient_checkpointing = enable
        self.backbone.set_grad_checkpointing(enable)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        levels = self.backbone(pixel_values)
        if self.channels_last_output:
            levels = [level.permute(0, 3, 1, 2) for level in levels]
        return list(levels)
