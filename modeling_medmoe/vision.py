"""The vision pyramid: a timm backbone built from config that returns 4 feature levels, finest first."""

from __future__ import annotations

import timm
import torch
from torch import nn

from .configuration_medmoe import MedMoEVisionConfig


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

    @property
    def gradient_checkpointing(self) -> bool:
        return bool(getattr(self, "_gradient_checkpointing", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        """Set by `PreTrainedModel.activation_checkpointing_enable`; forwards to timm's own switch."""
        self._gradient_checkpointing = enable
        self.backbone.set_grad_checkpointing(enable)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        levels = self.backbone(pixel_values)
        if self.channels_last_output:
            levels = [level.permute(0, 3, 1, 2) for level in levels]
        return list(levels)
