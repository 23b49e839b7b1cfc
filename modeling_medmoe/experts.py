# Copyright 2026 The MedMoE Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file except in compliance with
# the License. You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software distributed under the License is distributed on
# an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the
# specific language governing permissions and limitations under the License.
"""Modality experts: multi-scale fusion with per-location scale attention, and hard top-1 sparse dispatch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_medmoe import MedMoEVisionConfig
from .distributed import several_processes


class ScaleProjection(nn.Sequential):
    """Brings one pyramid level to width D: a 1x1 conv, then (depth - 1) GroupNorm -> GELU -> 3x3 conv blocks.

    [n, C_l, H_l, W_l] -> [n, D, H_l, W_l]. GroupNorm keeps the result independent of which other samples share
    the expert's micro-batch.
    """

    def __init__(self, in_channels: int, width: int, depth: int, norm_groups: int):
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, kernel_size=1)]
        for _ in range(depth - 1):
            layers += [
                nn.GroupNorm(math.gcd(norm_groups, width), width),
                nn.GELU(),
                nn.Conv2d(width, width, kernel_size=3, padding=1),
            ]
        super().__init__(*layers)


def resize(feature_map: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of [n, C, H, W] to [n, C, *grid_size] (the map itself when it already has that size)."""
    if feature_map.shape[-2:] == grid_size:
        return feature_map
    return F.interpolate(feature_map, size=grid_size, mode="bilinear", align_corners=False)


class ScaleFusionExpert(GradientCheckpointingLayer):
    """One modality expert E_k: V_k = sum_l beta_k^(l) * F_k^(l) (paper, section 4).

    Every level l is projected to width D (F_k^(l)) and resized in 2-D to the local grid; an MLP
    (D -> hidden -> 1, shared across levels) scores each level at each location; a softmax over levels gives the
    scale attention beta. With activation checkpointing on (`PreTrainedModel.activation_checkpointing_enable`), an
    expert keeps only its inputs and recomputes the rest in the backward pass.
    """

    def __init__(self, level_channels: list[int], config: MedMoEVisionConfig):
        super().__init__()
        width = config.expert_dim
        hidden = config.scale_attention_hidden_dim or width // 2
        self.projections = nn.ModuleList(
            ScaleProjection(channels, width, config.expert_depth, config.norm_groups) for channels in level_channels
        )
        self.scale_scorer = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, *levels: torch.Tensor, grid_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """levels: 4 maps [n, C_l, H_l, W_l]. Returns (local map [n, D, h, w], scale attention [n, levels, h, w])."""
        stacked = torch.stack(
            [project_to_grid(projection, level, grid_size) for projection, level in zip(self.projections, levels)],
            dim=1,
        )  # [n, levels, h, w, D]
        scale_attention = self.scale_scorer(stacked).squeeze(-1).softmax(dim=1)  # [n, levels, h, w]
        local_map = (scale_attention.unsqueeze(-1) * stacked).sum(dim=1)  # [n, h, w, D]
        return local_map.permute(0, 3, 1, 2), scale_attention


def project_to_grid(projection: ScaleProjection, level: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """One level [n, C, H, W] projected to width D and resized to the grid, channels last: [n, h, w, D].

    A lone 1x1 conv (depth 1) is a linear map of each location's channels: it runs as a matrix product on the
    channels-last layout the backbone gives (timm's Swin levels are NHWC) and, since it commutes with bilinear
    resizing (both linear; a resize's weights sum to 1), at whichever of the level and the grid has fewer locations.
    """
    if len(projection) > 1:
        return resize(projection(level), grid_size).permute(0, 2, 3, 1)
    conv = projection[0]
    if level.shape[-2] * level.shape[-1] > grid_size[0] * grid_size[1]:
        level = resize(level, grid_size)
    projected = F.linear(level.permute(0, 2, 3, 1), conv.weight.flatten(1), conv.bias)  # [n, H, W, D]
    return resize(projected.permute(0, 3, 1, 2), grid_size).permute(0, 2, 3, 1)


class RouterMLP(nn.Sequential):
    """alpha = softmax(W2 ReLU(W1 x)); this module returns the logits W2 ReLU(W1 x): [n, in] -> [n, K]."""

    def __init__(self, in_features: int, hidden_features: int, num_experts: int):
        super().__init__(nn.Linear(in_features, hidden_features), nn.ReLU(), nn.Linear(hidden_features, num_experts))


class MixtureOfModalityExperts(nn.Module):
    """K experts with hard top-1 dispatch.

    `sparse` (default): the batch is sorted by expert, each expert runs once on its group, and the outputs are put
    back in batch order, so each sample runs through its chosen expert only. `dense` runs every expert on every
    sample and keeps the chosen output (the authors' implementation; K times the head cost, kept for comparison).
    While `torch.export` traces the model, dispatch is dense: the sparse groups' sizes depend on the data, which an
    exported graph cannot hold; the numbers are the same.

    As in the authors' code, the chosen expert's output is scaled by its gate probability as p / stop_gradient(p):
    1 in value, but the router receives the gradient of the output's scale. What that scale tells the router is
    little: the global loss compares L2-normalised embeddings, blind to the scale (about 2e-6 at initialisation);
    only the local loss, whose word-region attention is scale-sensitive, gives it a gradient, and, through the
    router's input, so does the backbone's last level. What teaches routing is the report-type cross-entropy. The
    scale is computed as exp(log p - stop_gradient(log p)), finite where p underflows to 0 (a forced expert the
    router rules out).
    """

    def __init__(self, level_channels: list[int], num_experts: int, config: MedMoEVisionConfig):
        super().__init__()
        self.experts = nn.ModuleList(ScaleFusionExpert(level_channels, config) for _ in range(num_experts))
        self.dispatch = config.expert_dispatch

    def forward(
        self,
        levels: list[torch.Tensor],
        expert_index: torch.Tensor,
        gate_log_probability: torch.Tensor,
        grid_size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """levels: 4 maps [batch, C_l, H_l, W_l]; expert_index, gate_log_probability (log p of the chosen expert):
        [batch].

        Returns (local map [batch, D, h, w], scale attention [batch, levels, h, w]).
        """
        run = self.run_dense if self.dispatch == "dense" or torch.compiler.is_exporting() else self.run_sparse
        local_map, scale_attention = run(levels, expert_index, grid_size)
        straight_through = (gate_log_probability - gate_log_probability.detach()).exp()  # p / sg(p), never 0 / 0
        return local_map * straight_through.to(local_map.dtype)[:, None, None, None], scale_attention

    def run_sparse(self, levels, expert_index, grid_size):
        order = torch.argsort(expert_index, stable=True)
        group_sizes = torch.bincount(expert_index, minlength=len(self.experts)).tolist()
        # split (not slicing) so that the backward pass concatenates the groups' gradients instead of adding up
        # zero-padded copies of every level
        groups_per_level = [level.index_select(0, order).split(group_sizes) for level in levels]
        local_maps, scale_attentions = [], []
        for expert, size, *group in zip(self.experts, group_sizes, *groups_per_level):
            if size == 0:
                continue
            local_map, scale_attention = expert(*group, grid_size=grid_size)
            local_maps.append(local_map)
            scale_attentions.append(scale_attention)
        restore = torch.argsort(order)
        local_map = torch.cat(local_maps).index_select(0, restore)
        idle = [expert for expert, size in zip(self.experts, group_sizes) if size == 0]
        if idle and torch.is_grad_enabled() and several_processes():
            # Zero-valued use of the idle experts' weights: every process then gives every weight a gradient, as
            # data-parallel wrappers that reduce gradients in buckets (FSDP2) need. Only then: in one process an
            # idle expert keeps no gradient, so AdamW leaves it as it is (a zero gradient would still move it by
            # weight decay and momentum).
            local_map = local_map + 0.0 * sum(parameter.sum() for expert in idle for parameter in expert.parameters())
        return local_map, torch.cat(scale_attentions).index_select(0, restore)

    def run_dense(self, levels, expert_index, grid_size):
        outputs = [expert(*levels, grid_size=grid_size) for expert in self.experts]
        rows = torch.arange(expert_index.shape[0], device=expert_index.device)
        local_maps = torch.stack([local_map for local_map, _ in outputs], dim=1)  # [batch, K, D, h, w]
        scale_attentions = torch.stack([attention for _, attention in outputs], dim=1)
        return local_maps[rows, expert_index], scale_attentions[rows, expert_index]
