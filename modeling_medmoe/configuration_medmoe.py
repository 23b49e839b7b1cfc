# Copyright 2026 The MedMoE Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file except in compliance with
# the License. You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software distributed under the License is distributed on
# an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the
# specific language governing permissions and limitations under the License.
"""MedMoE configuration: a timm vision pyramid with modality experts, a transformers text encoder, and losses.

`MedMoEConfig.from_preset(name)` gives the named configurations:

- ``"nano"``: a few-million-parameter model at 64 px for CPU tests and the default pretraining job.
- ``"small"``: 128 px, a slim Swin and a small BERT, sized for a real-data run on 2 CPU cores.
- ``"swin-tiny"``: the paper's configuration (Swin-T at 224 px, 6 experts, D = 768, BERT-base text tower).
"""

from __future__ import annotations

import copy
from typing import Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

DEFAULT_EXPERT_NAMES = ("X-ray", "CT", "MRI", "ultrasound", "pathology", "fundus")
# The report_type_labels value of a report whose type is unknown: the routing losses leave it out (cross-entropy's
# ignore index).
UNKNOWN_REPORT_TYPE = -100
ROUTER_INPUTS = ("image", "text", "text_teacher")
# The Auto classes a saved MedMoE folder answers to with trust_remote_code=True (the zero-shot pipeline loads
# AutoModelForZeroShotImageClassification).
AUTO_MAP = {
    "AutoConfig": "configuration_medmoe.MedMoEConfig",
    "AutoModel": "modeling_medmoe.MedMoEModel",
    "AutoModelForZeroShotImageClassification": "modeling_medmoe.MedMoEModel",
    "AutoModelForImageClassification": "modeling_medmoe.MedMoEForImageClassification",
}
# pipeline("zero-shot-image-classification", model=FOLDER, trust_remote_code=True) builds MedMoE's own pipeline,
# which reads DICOM and scores with the model's zero-shot methods.
CUSTOM_PIPELINES = {
    "zero-shot-image-classification": {
        "impl": "pipeline_medmoe.MedMoEZeroShotImageClassificationPipeline",
        "pt": ["AutoModelForZeroShotImageClassification"],
        "type": "multimodal",
    }
}


class MedMoEVisionConfig(PreTrainedConfig):
    """The image side: a timm backbone giving a 4-level pyramid (H/4..H/32) and the modality experts on top of it.

    Args:
        backbone: any timm model name with 4 feature levels at strides 4, 8, 16 and 32 (Swin by default).
        backbone_kwargs: keyword arguments for `timm.create_model` that override the named architecture
            (e.g. ``embed_dim``, ``depths``, ``num_heads``, ``window_size``).
        backbone_out_indices: which of timm's feature levels form the pyramid, finest first.
        image_size: side of the square input image in pixels.
        num_channels: input channels (the image processor always gives 3).
        expert_dim: D, the width every pyramid level is projected to inside an expert.
        expert_depth: 1 = one 1x1 projection per scale (the paper's Table 3); >1 adds (depth - 1) blocks of
            GroupNorm -> GELU -> 3x3 conv per scale (GroupNorm does not depend on the batch).
        scale_attention_hidden_dim: hidden width of the per-location scale-attention MLP (default D // 2).
        local_grid_size: side of the grid all scales are resized to (default: the finest level, H/4).
        router_hidden_dim: hidden width of the router MLPs (default: `router_hidden_ratio` of the coarsest level's
            channels, at least the number of experts).
        router_hidden_ratio: see `router_hidden_dim`.
        router_levels: what the image router reads: ``"last"`` the coarsest level, average-pooled (the paper);
            ``"all"`` every level average-pooled and concatenated, so texture from the finer levels (where CT and
            MRI differ most) reaches the routing decision too.
        norm_groups: GroupNorm groups in the expert blocks (the greatest common divisor with D when D is not a
            multiple).
        expert_dispatch: "sparse" runs each sample through its chosen expert only; "dense" runs all K experts and
            keeps the chosen output (the authors' way; for comparison and benchmarks).
    """

    model_type = "medmoe_vision_model"
    base_config_key = "vision_config"
    attribute_map = {"hidden_size": "expert_dim"}  # the width of the image side's output sequence, as CLIP names it

    backbone: str = "swin_tiny_patch4_window7_224"
    backbone_kwargs: dict | None = None
    backbone_out_indices: list[int] | tuple[int, ...] = (0, 1, 2, 3)
    image_size: int = 224
    num_channels: int = 3
    expert_dim: int = 768
    expert_depth: int = 1
    scale_attention_hidden_dim: int | None = None
    local_grid_size: int | None = None
    router_hidden_dim: int | None = None
    router_hidden_ratio: float = 0.5
    router_levels: Literal["last", "all"] = "last"
    norm_groups: int = 32
    expert_dispatch: Literal["sparse", "dense"] = "sparse"

    def validate_architecture(self):
        if self.expert_dispatch not in ("sparse", "dense"):
            raise ValueError(f"expert_dispatch must be 'sparse' or 'dense', got {self.expert_dispatch!r}.")
        if self.router_levels not in ("last", "all"):
            raise ValueError(f"router_levels must be 'last' or 'all', got {self.router_levels!r}.")
        if len(self.backbone_out_indices) != 4:
            raise ValueError(f"backbone_out_indices must name 4 feature levels, got {self.backbone_out_indices}.")
        if self.expert_depth < 1:
            raise ValueError(f"expert_depth must be >= 1, got {self.expert_depth}.")


class MedMoEConfig(PreTrainedConfig):
    """Configuration of `MedMoEModel`.

    Args:
        vision_config: a `MedMoEVisionConfig` or its dict.
        text_config: a transformers encoder config or its dict (BERT by default); set `text_config.vocab_size` to
            match your tokenizer.
        projection_dim: width P of the shared image-text space (global and local embeddings).
        num_experts: K, the number of modality experts (1 = no mixture).
        expert_names: the report type each expert stands for; report-type labels index this list.
        router_input: who chooses each image's expert while training: ``"image"`` the image router (pooled
            backbone features); ``"text"`` the paired report's router, with the image router learning the report
            type beside it; ``"text_teacher"`` the paired report's router, with the image router distilled to its
            choices. Outside training the image router always chooses (no image's own report is known at
            inference); pass ``expert_index`` to choose by hand.
        text_hidden_layers_to_sum: the text features are the sum of this many last hidden layers (GLoRIA: 4).
        logit_scale_init_value: initial log of the global contrastive logit scale (CLIP: log(1 / 0.07)).
        logit_scale_max: the logit scale's cap (CLIP: 100).
        local_temperature_attention / local_temperature_word / local_temperature_logits: GLoRIA's temp1, temp2 and
            temp3 (4, 5, 10).
        local_loss_chunk_size: captions per chunk in the local loss (bounds memory; 0 = no chunking).
        global_loss_weight, local_loss_weight: weights of the two contrastive losses (0 switches one off).
        report_type_loss_weight: lambda for the report-type cross-entropy on the report embedding (paper 4.5).
        router_loss_weight: weight of the router's cross-entropy against the report type (or the text router).
        load_balance_loss_weight: weight of the Switch-style load-balancing loss (0 = off).
    """

    model_type = "medmoe"
    sub_configs_defaults = {
        "vision_config": MedMoEVisionConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
    }

    vision_config: dict | MedMoEVisionConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projection_dim: int = 512
    num_experts: int = 6
    expert_names: list[str] | tuple[str, ...] | None = None
    router_input: Literal["image", "text", "text_teacher"] = "image"
    text_hidden_layers_to_sum: int = 4
    logit_scale_init_value: float = 2.6592
    logit_scale_max: float = 100.0
    local_temperature_attention: float = 4.0
    local_temperature_word: float = 5.0
    local_temperature_logits: float = 10.0
    local_loss_chunk_size: int = 8
    global_loss_weight: float = 1.0
    local_loss_weight: float = 1.0
    report_type_loss_weight: float = 1.0
    router_loss_weight: float = 1.0
    load_balance_loss_weight: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.expert_names is None:
            self.expert_names = (
                list(DEFAULT_EXPERT_NAMES)
                if self.num_experts == len(DEFAULT_EXPERT_NAMES)
                else [f"expert_{index}" for index in range(self.num_experts)]
            )
        self.expert_names = list(self.expert_names)
        kwargs["auto_map"] = {**AUTO_MAP, **(kwargs.get("auto_map") or {})}
        kwargs["custom_pipelines"] = {**copy.deepcopy(CUSTOM_PIPELINES), **(kwargs.get("custom_pipelines") or {})}
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if len(self.expert_names) != self.num_experts:
            raise ValueError(f"expert_names has {len(self.expert_names)} names but num_experts is {self.num_experts}.")
        if self.router_input not in ROUTER_INPUTS:
            raise ValueError(f"router_input must be one of {ROUTER_INPUTS}, got {self.router_input!r}.")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MedMoEConfig":
        """Build a named configuration (`PRESETS`); keyword arguments override top-level fields."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        preset = copy.deepcopy(PRESETS[name])
        preset.update(overrides)
        return cls(**preset)


PRESETS: dict[str, dict] = {
    "nano": {
        "vision_config": {
            "backbone": "swin_tiny_patch4_window7_224",
            "backbone_kwargs": {"embed_dim": 32, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8], "window_size": 4},
            "image_size": 64,
            "expert_dim": 64,
        },
        "text_config": {
            "model_type": "bert",
            "vocab_size": 2048,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 128,
            "max_position_embeddings": 128,
        },
        "projection_dim": 64,
        "text_hidden_layers_to_sum": 2,
    },
    # Sized for a real-data run of minutes on 2 CPU cores.
    "small": {
        "vision_config": {
            "backbone": "swin_tiny_patch4_window7_224",
            "backbone_kwargs": {"embed_dim": 32, "depths": [1, 1, 3, 1], "num_heads": [1, 2, 4, 8], "window_size": 4},
            "image_size": 128,
            "expert_dim": 96,
            "local_grid_size": 16,
            # The router reads every level, not only the coarsest: texture, where CT and MRI differ most, is in the
            # finer ones.
            "router_levels": "all",
        },
        "text_config": {
            "model_type": "bert",
            "vocab_size": 8192,
            "hidden_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "intermediate_size": 384,
            "max_position_embeddings": 128,
            # No dropout, as in CLIP: a run of minutes does not overfit, and dropout is costly on a small tower.
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        "projection_dim": 128,
        "text_hidden_layers_to_sum": 3,
        # The global loss alone: in a run of minutes on CPU the local loss's cost buys fewer steps than it is worth.
        "local_loss_weight": 0.0,
    },
    "swin-tiny": {
        "vision_config": {
            "backbone": "swin_tiny_patch4_window7_224",
            "image_size": 224,
            "expert_dim": 768,
        },
        "text_config": {"model_type": "bert"},
        "projection_dim": 768,
    },
}


MedMoEConfig.register_for_auto_class()
