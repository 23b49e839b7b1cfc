# Copyright 2026 The MedMoE Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file except in compliance with
# the License. You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software distributed under the License is distributed on
# an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the
# specific language governing permissions and limitations under the License.
"""MedMoE: a CLIP-style medical vision-language model with a mixture of modality experts (arXiv 2506.08356).

Data flow: pixel_values -> VisionPyramid (4 levels) -> router (hard top-1) -> the chosen ScaleFusionExpert ->
local map [B, D, h, w] -> region embeddings and a pooled image embedding; input_ids -> TextTower -> report
embedding and word embeddings; then the global, local and routing losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_medmoe import MedMoEConfig
from .experts import MixtureOfModalityExperts, RouterMLP
from .losses import (
    global_contrastive_loss,
    load_balancing_loss,
    local_contrastive_loss,
    report_type_cross_entropy,
    word_region_attention,
)
from .text import TextTower, merge_word_pieces
from .vision import BACKBONE_LAYER, VisionPyramid, initialise_like_timm
from .zero_shot import DEFAULT_PROMPT_TEMPLATES, zero_shot_class_embeddings, zero_shot_probabilities


@dataclass
class MedMoEOutput(ModelOutput):
    """Outputs of `MedMoEModel.forward`. B_i images, B_t reports, P = projection_dim, K experts, (h, w) the local
    grid, W words, D = expert_dim.

    Args:
        loss: [] weighted total of the loss parts below (with `return_loss=True`).
        logits_per_image: [B_i, B_t] scaled cosine similarities of every image with every report.
        logits_per_text: [B_t, B_i] the transpose of `logits_per_image`.
        image_embeds: [B_i, P] L2-normalised global image embeddings.
        text_embeds: [B_t, P] L2-normalised global report embeddings.
        region_embeds: [B_i, h * w, P] local image embeddings, row-major over the grid (with `word_ids`).
        word_embeds: [B_t, W, P] word embeddings: word pieces merged, special tokens and punctuation dropped (with
            `word_ids`).
        word_mask: [B_t, W] True for real words (with `word_ids`).
        word_region_attention: [B, W, h, w] attention of each report's words over its own image (paired batches
            with `word_ids`).
        local_map: [B_i, D, h, w] the chosen expert's fused multi-scale map.
        scale_attention: [B_i, 4, h, w] the chosen expert's softmax over pyramid levels at each location.
        router_logits: [B_i, K] the image router's logits.
        text_router_logits: [B_t, K] the report router's logits (the report-type classifier of the paper's 4.5).
        expert_index: [B_i] the expert each image was routed to.
        global_loss: [] the image-report InfoNCE, unweighted.
        local_loss: [] GLoRIA's word-region loss, unweighted (when its weight is above 0).
        report_type_loss: [] the report router's cross-entropy against the report type (with labels).
        router_loss: [] the image router's cross-entropy (with labels).
        load_balance_loss: [] the Switch load-balancing loss (when its weight is above 0).
        text_model_output: `get_text_features`' output for the reports (token features, the projected report
            embedding, and the text encoder's hidden states and attentions when asked for).
        vision_model_output: `get_image_features`' output for the images (regions, the projected image embedding,
            and the pyramid levels and fused map as hidden states when asked for).
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    region_embeds: torch.FloatTensor | None = None
    word_embeds: torch.FloatTensor | None = None
    word_mask: torch.BoolTensor | None = None
    word_region_attention: torch.FloatTensor | None = None
    local_map: torch.FloatTensor | None = None
    scale_attention: torch.FloatTensor | None = None
    router_logits: torch.FloatTensor | None = None
    text_router_logits: torch.FloatTensor | None = None
    expert_index: torch.LongTensor | None = None
    global_loss: torch.FloatTensor | None = None
    local_loss: torch.FloatTensor | None = None
    report_type_loss: torch.FloatTensor | None = None
    router_loss: torch.FloatTensor | None = None
    load_balance_loss: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None


@dataclass
class ImageEncoding(ModelOutput):
    """The image side of MedMoE; shapes as in `MedMoEOutput`. `image_embeds` here is not normalised; `regions`
    [B, h * w, D] is the local map as a sequence (project it with `region_projection` for region embeddings);
    `hidden_states` (when asked for): the 4 pyramid levels [B, C_l, H_l, W_l], finest first, then the local map."""

    image_embeds: torch.FloatTensor | None = None
    regions: torch.FloatTensor | None = None
    local_map: torch.FloatTensor | None = None
    scale_attention: torch.FloatTensor | None = None
    router_logits: torch.FloatTensor | None = None
    expert_index: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None

    def as_model_output(self) -> BaseModelOutputWithPooling:
        """What `get_image_features` returns (see there)."""
        return BaseModelOutputWithPooling(
            last_hidden_state=self.regions, pooler_output=self.image_embeds, hidden_states=self.hidden_states
        )


@dataclass
class TextEncoding(ModelOutput):
    """The text side of MedMoE; shapes as in `MedMoEOutput`. `text_embeds` here is not normalised; `hidden_states`
    and `attentions` are the text encoder's (when asked for)."""

    text_embeds: torch.FloatTensor | None = None
    word_embeds: torch.FloatTensor | None = None
    word_mask: torch.BoolTensor | None = None
    text_router_logits: torch.FloatTensor | None = None
    token_features: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None

    def as_model_output(self) -> BaseModelOutputWithPooling:
        """What `get_text_features` returns (see there)."""
        return BaseModelOutputWithPooling(
            last_hidden_state=self.token_features,
            pooler_output=self.text_embeds,
            hidden_states=self.hidden_states,
            attentions=self.attentions,
        )


class ProjectionLinear(nn.Linear):
    """A linear head of ours (projections, classifier), initialised normal(0, initializer_range) (`_init_weights`)."""


class MedMoEVisionModel(nn.Module):
    """The image side, as CLIP's vision transformer inside CLIPModel: the vision pyramid, the image router, the
    modality experts and the image projection.

    `route` runs the pyramid and the router, `encode` the chosen experts and the projection; between the two the
    caller chooses the experts (`choose_experts` over `MedMoEModel.routing_logits`: a given index, the image router,
    or while training the paired reports' router). `forward` does all three with this module's own router.
    """

    def __init__(self, config: MedMoEConfig):
        super().__init__()
        self.config = config
        vision_config = config.vision_config
        self.vision_pyramid = VisionPyramid(vision_config)
        levels = self.vision_pyramid.channels
        self.experts = MixtureOfModalityExperts(levels, config.num_experts, vision_config)
        router_hidden_dim = vision_config.router_hidden_dim or max(
            int(vision_config.router_hidden_ratio * levels[-1]), config.num_experts
        )
        self.router_levels = vision_config.router_levels
        router_features = sum(levels) if self.router_levels == "all" else levels[-1]
        self.image_router = RouterMLP(router_features, router_hidden_dim, config.num_experts)
        self.image_projection = ProjectionLinear(vision_config.expert_dim, config.projection_dim)
        grid = vision_config.local_grid_size or vision_config.image_size // self.vision_pyramid.reductions[0]
        self.local_grid_size = (grid, grid)

    def route(self, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """pixel_values [B, 3, H, W] -> (the 4 pyramid levels [B, C_l, H_l, W_l], router logits [B, K])."""
        levels = self.vision_pyramid(pixel_values)
        read = levels if self.router_levels == "all" else levels[-1:]
        return levels, self.image_router(torch.cat([level.mean(dim=(2, 3)) for level in read], dim=1))

    def encode(
        self,
        levels: list[torch.Tensor],
        router_logits: torch.Tensor,
        expert_index: torch.Tensor,
        gate_log_probability: torch.Tensor,
        output_hidden_states: bool | None = None,
    ) -> ImageEncoding:
        """The chosen experts ([B]; log p of each choice [B] scales the output, see MixtureOfModalityExperts) and
        the projection -> `ImageEncoding` (with the levels and the local map as hidden states when
        `output_hidden_states`, default: `vision_config.output_hidden_states`)."""
        if output_hidden_states is None:
            output_hidden_states = self.config.vision_config.output_hidden_states
        local_map, scale_attention = self.experts(levels, expert_index, gate_log_probability, self.local_grid_size)
        regions = local_map.flatten(2).transpose(1, 2)  # [B, h * w, D]
        return ImageEncoding(
            image_embeds=self.image_projection(regions.mean(dim=1)),
            regions=regions,
            local_map=local_map,
            scale_attention=scale_attention,
            router_logits=router_logits,
            expert_index=expert_index,
            hidden_states=requested_hidden_states((*levels, local_map), output_hidden_states),
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        expert_index: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> ImageEncoding:
        """pixel_values [B, 3, H, W] -> `ImageEncoding`, the experts `expert_index` [B] or the image router's."""
        levels, router_logits = self.route(pixel_values)
        expert_index, gate_log_probability = choose_experts(router_logits, expert_index)
        return self.encode(levels, router_logits, expert_index, gate_log_probability, output_hidden_states)


def requested_hidden_states(
    hidden_states: tuple[torch.Tensor, ...], request: bool | list[int] | None
) -> tuple[torch.Tensor | None, ...] | None:
    """The hidden states an `output_hidden_states` request asks for: all (True), none (False, None), or, as
    transformers' models take it, a list of indices (negative from the end), the others None."""
    if not request:
        return None
    if request is True:
        return hidden_states
    wanted = {index % len(hidden_states) for index in request}
    return tuple(state if index in wanted else None for index, state in enumerate(hidden_states))


def choose_experts(
    routing_logits: torch.Tensor, expert_index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert_index [B]: the given one or the argmax of `routing_logits` [B, K]; log p [B] of each chosen expert)."""
    log_probabilities = routing_logits.float().log_softmax(dim=-1)
    if expert_index is None:
        expert_index = log_probabilities.argmax(dim=-1)
    return expert_index, log_probabilities.gather(1, expert_index[:, None]).squeeze(1)


class MedMoEPreTrainedModel(PreTrainedModel):
    config: MedMoEConfig
    config_class = MedMoEConfig
    base_model_prefix = "medmoe"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """How each of our modules starts, at construction and for every weight a checkpoint lacks (transformers'
        init functions leave loaded weights alone): the timm backbone as timm initialises it
        (`vision.initialise_like_timm`); our heads (projections, classifier) normal(0, initializer_range) with zero
        biases; the experts' and routers' layers PyTorch's defaults (kaiming-uniform);
        the logit scale its initial value. The text encoder is a transformers model: transformers calls its own
        `_init_weights`. Loading builds the model on the meta device, so timm modules recompute their non-persistent
        buffers (e.g. Swin's relative position index) here."""
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
        if getattr(module, BACKBONE_LAYER, False):
            initialise_like_timm(module)
        elif isinstance(module, ProjectionLinear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d, nn.GroupNorm)):
            module.reset_parameters()
        elif isinstance(module, MedMoEModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)


class MedMoEModel(MedMoEPreTrainedModel):
    """MedMoE: image and report encoders in a shared space, with hard top-1 modality experts on the image side.

    Example:
        >>> config = MedMoEConfig.from_preset("nano")
        >>> model = MedMoEModel(config)
        >>> out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, word_ids=word_ids, return_loss=True)
    """

    def __init__(self, config: MedMoEConfig):
        super().__init__(config)
        self.vision_model = MedMoEVisionModel(config)
        self.text_tower = TextTower(config.text_config, config.text_hidden_layers_to_sum)
        text_hidden = config.text_config.hidden_size
        router_hidden_dim = self.vision_model.image_router[0].out_features
        self.text_router = RouterMLP(text_hidden, router_hidden_dim, config.num_experts)
        self.region_projection = ProjectionLinear(config.vision_config.expert_dim, config.projection_dim)
        self.text_projection = ProjectionLinear(text_hidden, config.projection_dim)
        self.word_projection = ProjectionLinear(text_hidden, config.projection_dim)
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The text encoder's token embeddings (`resize_token_embeddings` grows them with a tokenizer's new words)."""
        return self.text_tower.encoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_tower.encoder.set_input_embeddings(value)

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        word_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> TextEncoding:
        """Text side. input_ids [B, L] (and word_ids [B, L] for word embeddings) -> `TextEncoding`, with the text
        encoder's hidden states and attentions when asked for (default: as `text_config` says)."""
        if output_hidden_states is None:
            output_hidden_states = self.config.text_config.output_hidden_states
        token_features, encoded = self.text_tower(input_ids, attention_mask, token_type_ids, output_attentions)
        report_feature = token_features[:, 0]
        word_embeds = word_mask = None
        if word_ids is not None:
            word_features, word_mask = merge_word_pieces(token_features, word_ids)
            word_embeds = self.word_projection(word_features)
        return TextEncoding(
            text_embeds=self.text_projection(report_feature),
            word_embeds=word_embeds,
            word_mask=word_mask,
            text_router_logits=self.text_router(report_feature),
            token_features=token_features,
            hidden_states=requested_hidden_states(encoded.hidden_states, output_hidden_states),
            attentions=encoded.attentions,
        )

    def compile_towers(self, **compile_kwargs) -> None:
        """torch.compile the backbone and the text tower in place (parameter names and checkpoints unchanged). The
        experts and the losses stay eager: their batch shapes change with routing. Keyword arguments go to
        `torch.compile`."""
        self.vision_model.vision_pyramid.compile(**compile_kwargs)
        self.text_tower.compile(**compile_kwargs)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        expert_index: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> BaseModelOutputWithPooling:
        """pooler_output: the projected global image embedding [B, P] (not normalised, as CLIP);
        last_hidden_state: the chosen expert's local map as a sequence [B, h * w, D]; hidden_states (with
        `output_hidden_states`, default `vision_config.output_hidden_states`): the 4 pyramid levels [B, C_l, H_l, W_l],
        finest first, and the local map [B, D, h, w]. The image side returns no attention weights (timm computes the
        backbone's fused, without them; the experts' attention over levels is `MedMoEOutput.scale_attention`), so
        `output_attentions` leaves `attentions` None. `expert_index` [B] forces the experts."""
        return self.vision_model(pixel_values, expert_index, output_hidden_states).as_model_output()

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> BaseModelOutputWithPooling:
        """pooler_output: the projected report embedding [B, P] (not normalised, as CLIP); last_hidden_state: the
        token features [B, L, hidden] (the sum of the last `text_hidden_layers_to_sum` layers); hidden_states and
        attentions: the text encoder's, when asked for (default: as `text_config` says)."""
        return self.encode_text(
            input_ids, attention_mask, token_type_ids, None, output_hidden_states, output_attentions
        ).as_model_output()

    def get_zero_shot_class_embeddings(
        self, tokenizer, class_names: list[str], templates: list[str] | tuple[str, ...] = DEFAULT_PROMPT_TEMPLATES
    ) -> torch.Tensor:
        """[C, P] normalised class embeddings from prompts (see `zero_shot.zero_shot_class_embeddings`)."""
        return zero_shot_class_embeddings(self, tokenizer, class_names, templates)

    def zero_shot_probabilities(self, image_embeds: torch.Tensor, class_embeds: torch.Tensor) -> torch.Tensor:
        """[N, C] class probabilities of images ([N, P], e.g. `get_image_features(...).pooler_output`) at this
        model's logit scale, the scale `logits_per_image` uses."""
        return zero_shot_probabilities(image_embeds, class_embeds, self.clamped_logit_scale().float())

    def clamped_logit_scale(self) -> torch.Tensor:
        """exp(logit_scale), capped at `config.logit_scale_max`."""
        return self.logit_scale.exp().clamp(max=self.config.logit_scale_max)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        word_ids: torch.Tensor | None = None,
        report_type_labels: torch.Tensor | None = None,
        expert_index: torch.Tensor | None = None,
        return_loss: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> MedMoEOutput:
        """Encode images and/or reports; with both, score every image against every report.

        Args:
            input_ids, attention_mask, token_type_ids: [B_t, L] tokenised reports.
            pixel_values: [B_i, 3, H, W] from `MedMoEImageProcessor`.
            word_ids: [B_t, L] word index of each token, -1 for non-words (from `MedMoEProcessor`); needed for the
                word embeddings and the local loss.
            report_type_labels: [B] report type per pair (index into `config.expert_names`, -100 = unknown); when
                left out, the routing losses are skipped.
            expert_index: [B_i] force these experts instead of routing.
            return_loss: compute the losses (needs paired batches, B_i == B_t).
            output_hidden_states, output_attentions: the towers' hidden states and the text encoder's attentions in
                `text_model_output` and `vision_model_output` (see `get_text_features`, `get_image_features`).
            return_dict: False returns a tuple (default: `config.return_dict`).
        """
        text = None
        if input_ids is not None:
            text = self.encode_text(
                input_ids, attention_mask, token_type_ids, word_ids, output_hidden_states, output_attentions
            )
        image = None
        if pixel_values is not None:
            levels, router_logits = self.vision_model.route(pixel_values)
            text_router_logits = text.text_router_logits if text is not None else None
            chosen, gate_log_probability = choose_experts(
                self.routing_logits(router_logits, text_router_logits), expert_index
            )
            image = self.vision_model.encode(levels, router_logits, chosen, gate_log_probability, output_hidden_states)
        if return_loss and (text is None or image is None):
            raise ValueError("return_loss=True needs both input_ids and pixel_values.")
        text_embeds = F.normalize(text.text_embeds, dim=-1) if text is not None else None
        image_embeds = F.normalize(image.image_embeds, dim=-1) if image is not None else None
        logits_per_text = region_embeds = word_region_attention = None
        losses = {}
        if text is not None and image is not None:
            logit_scale = self.clamped_logit_scale()
            logits_per_text = logit_scale * text_embeds @ image_embeds.T
            if text.word_embeds is not None:
                region_embeds = self.region_projection(image.regions)
                if region_embeds.shape[0] == text.word_embeds.shape[0]:
                    word_region_attention = self._paired_word_region_attention(text, region_embeds)
            if return_loss:
                losses = self._losses(
                    text, image, text_embeds, image_embeds, region_embeds, logit_scale, report_type_labels
                )
        return MedMoEOutput(
            logits_per_image=logits_per_text.T if logits_per_text is not None else None,
            logits_per_text=logits_per_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            region_embeds=region_embeds,
            word_embeds=text.word_embeds if text is not None else None,
            word_mask=text.word_mask if text is not None else None,
            word_region_attention=word_region_attention,
            local_map=image.local_map if image is not None else None,
            scale_attention=image.scale_attention if image is not None else None,
            router_logits=image.router_logits if image is not None else None,
            text_router_logits=text.text_router_logits if text is not None else None,
            expert_index=image.expert_index if image is not None else None,
            text_model_output=text.as_model_output() if text is not None else None,
            vision_model_output=image.as_model_output() if image is not None else None,
            **losses,
        )

    def _paired_word_region_attention(self, text: TextEncoding, region_embeds: torch.Tensor) -> torch.Tensor:
        """Attention of report i's words over image i's regions: [B, W, h, w]."""
        scores = torch.einsum("bwp,brp->bwr", text.word_embeds, region_embeds)
        attention = word_region_attention(scores, text.word_mask, self.config.local_temperature_attention)
        return attention.unflatten(-1, self.vision_model.local_grid_size)

    def routing_logits(self, image_router_logits: torch.Tensor, text_router_logits: torch.Tensor | None):
        """The logits the expert is chosen by: the image router's, except while training with `router_input`
        "text" or "text_teacher" and one paired report per image, when the report's router decides.

        Outside training the image router always decides: at inference nobody has an image's own report, and the
        texts passed with images (zero-shot prompts, retrieval candidates) must not choose the images' experts.
        """
        if self.config.router_input == "image" or not self.training or text_router_logits is None:
            return image_router_logits
        if text_router_logits.shape[0] != image_router_logits.shape[0]:
            raise ValueError(
                f"router_input={self.config.router_input!r} routes each training image by its paired report, but got "
                f"{image_router_logits.shape[0]} images and {text_router_logits.shape[0]} reports."
            )
        return text_router_logits

    def _losses(
        self,
        text: TextEncoding,
        image: ImageEncoding,
        text_embeds: torch.Tensor,
        image_embeds: torch.Tensor,
        region_embeds: torch.Tensor | None,
        logit_scale: torch.Tensor,
        report_type_labels: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """The loss parts that apply and their weighted total `loss`, as MedMoEOutput fields."""
        config = self.config
        if image_embeds.shape[0] != text_embeds.shape[0]:
            raise ValueError("The losses need one report per image (paired batches).")
        with record_function("medmoe::global loss"):
            parts = {
                "global_loss": global_contrastive_loss(image_embeds.float(), text_embeds.float(), logit_scale.float())
            }
        loss = config.global_loss_weight * parts["global_loss"]
        if config.local_loss_weight > 0:
            if text.word_embeds is None:
                raise ValueError("The local loss needs word_ids (MedMoEProcessor returns them).")
            with record_function("medmoe::local loss"):
                parts["local_loss"] = local_contrastive_loss(
                    text.word_embeds.float(),
                    text.word_mask,
                    region_embeds.float(),
                    config.local_temperature_attention,
                    config.local_temperature_word,
                    config.local_temperature_logits,
                    config.local_loss_chunk_size,
                )
            loss = loss + config.local_loss_weight * parts["local_loss"]
        if report_type_labels is not None and config.num_experts > 1:
            with record_function("medmoe::routing losses"):
                parts["report_type_loss"] = report_type_cross_entropy(text.text_router_logits, report_type_labels)
                parts["router_loss"] = self._router_loss(text, image, report_type_labels)
            loss = loss + config.report_type_loss_weight * parts["report_type_loss"]
            loss = loss + config.router_loss_weight * parts["router_loss"]
        if config.load_balance_loss_weight > 0:
            with record_function("medmoe::routing losses"):
                routing_logits = self.routing_logits(image.router_logits, text.text_router_logits)
                parts["load_balance_loss"] = load_balancing_loss(routing_logits.float(), image.expert_index)
            loss = loss + config.load_balance_loss_weight * parts["load_balance_loss"]
        return {"loss": loss, **parts}

    def _router_loss(self, text: TextEncoding, image: ImageEncoding, report_type_labels: torch.Tensor):
        """The image router's cross-entropy: against the report type ("image" and "text"; with "text" the image
        router routes whatever has no paired report, e.g. every image at inference), or against the text router's
        choice ("text_teacher": distillation, which also covers reports of unknown type)."""
        if self.config.router_input == "text_teacher":
            teacher_choice = text.text_router_logits.detach().argmax(dim=-1)
            return report_type_cross_entropy(image.router_logits, teacher_choice)
        return report_type_cross_entropy(image.router_logits, report_type_labels)


@dataclass
class MedMoEImageClassifierOutput(ModelOutput):
    """Outputs of `MedMoEForImageClassification`: loss (with labels), logits [B, num_labels], the routing
    (router_logits [B, K], expert_index [B]), the projected image embedding [B, P], and with
    `output_hidden_states` the pyramid levels and the local map (see `MedMoEModel.get_image_features`)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    router_logits: torch.FloatTensor | None = None
    expert_index: torch.LongTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class MedMoEForImageClassification(MedMoEPreTrainedModel):
    """The vision pyramid, the experts (routed by the image router) and a linear classifier on the projected image
    embedding. Uses `config.num_labels`, `id2label` and `label2id`; `from_pretrained` on a MedMoEModel folder reuses
    its vision weights and starts the classifier afresh."""

    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: MedMoEConfig):
        super().__init__(config)
        self.vision_model = MedMoEVisionModel(config)
        self.classifier = ProjectionLinear(config.projection_dim, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        expert_index: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> MedMoEImageClassifierOutput:
        """pixel_values [B, 3, H, W]; labels [B] class indices (cross-entropy loss when given); return_dict: False
        returns a tuple (default: `config.return_dict`)."""
        image = self.vision_model(pixel_values, expert_index, output_hidden_states)
        logits = self.classifier(image.image_embeds)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return MedMoEImageClassifierOutput(
            loss=loss,
            logits=logits,
            router_logits=image.router_logits,
            expert_index=image.expert_index,
            image_embeds=image.image_embeds,
            hidden_states=image.hidden_states,
        )


# Folders saved before the image side became `vision_model` name its weights without the prefix; saves keep those
# names on disk, so that older code still loads a new folder.
LEGACY_VISION_PREFIXES = ("vision_pyramid", "experts", "image_router", "image_projection")
for model_class in ("MedMoEModel", "MedMoEForImageClassification"):
    register_checkpoint_conversion_mapping(
        model_class,
        [WeightRenaming(rf"^{prefix}\.", f"vision_model.{prefix}.") for prefix in LEGACY_VISION_PREFIXES],
        overwrite=True,  # the module may be imported twice: as this package and as a saved folder's remote code
    )

MedMoEModel.register_for_auto_class("AutoModel")
MedMoEForImageClassification.register_for_auto_class("AutoModelForImageClassification")

# config.custom_pipelines names this pipeline; importing it here makes save_pretrained copy its file beside this one.
from .pipeline_medmoe import MedMoEZeroShotImageClassificationPipeline  # noqa: E402, F401
