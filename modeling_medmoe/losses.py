# Copyright 2026 The MedMoE Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file except in compliance with
# the License. You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software distributed under the License is distributed on
# an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the
# specific language governing permissions and limitations under the License.
"""MedMoE training losses: global InfoNCE, GLoRIA local word-region loss, routing losses.

Every contrastive loss is symmetric: the mean of the image->text and text->image cross-entropies.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .configuration_medmoe import UNKNOWN_REPORT_TYPE
from .distributed import gather_with_grad, global_mean, several_processes

COSINE_EPS = 1e-8
_softmax_backward = torch.ops.aten._softmax_backward_data


def global_contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch.

    L = 1/2 [CE(s * I T_all^T, y) + CE(s * T I_all^T, y)], with I, T the L2-normalised image and text embeddings
    [batch, P] of this process, I_all, T_all those of all processes (gathered with gradient), s the logit scale
    and y this process's rows in the gathered batch. Averaged over processes this is the loss of the whole
    global batch.
    """
    all_image_embeds, offset = gather_with_grad(image_embeds)
    all_text_embeds, _ = gather_with_grad(text_embeds)
    labels = torch.arange(image_embeds.shape[0], device=image_embeds.device) + offset
    image_to_text = F.cross_entropy(logit_scale * image_embeds @ all_text_embeds.T, labels)
    text_to_image = F.cross_entropy(logit_scale * text_embeds @ all_image_embeds.T, labels)
    return (image_to_text + text_to_image) / 2


def _softmaxes_over_words_then_regions(
    word_region_scores: torch.Tensor, word_mask: torch.Tensor, attention_temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GLoRIA's two softmaxes: (softmax_words(w . r), softmax_regions(temp1 * softmax_words(w . r))).

    word_region_scores: [..., words, regions]; word_mask: [..., words] (broadcastable), True for real words.
    Both results have the scores' shape; padding words get 0 in the first.
    """
    masked = word_region_scores.masked_fill(~word_mask.unsqueeze(-1), torch.finfo(word_region_scores.dtype).min)
    over_words = masked.softmax(dim=-2)
    return over_words, (attention_temperature * over_words).softmax(dim=-1)


def word_region_attention(
    word_region_scores: torch.Tensor, word_mask: torch.Tensor, attention_temperature: float
) -> torch.Tensor:
    """GLoRIA's attention of words over regions: softmax_regions(temp1 * softmax_words(w . r)).

    Args:
        word_region_scores: dot products w . r, [..., words, regions].
        word_mask: [..., words] (broadcastable), True for real words.

    Returns the scores' shape; each real word's attention sums to 1 over regions.
    """
    return _softmaxes_over_words_then_regions(word_region_scores, word_mask, attention_temperature)[1]


# Elements of one block of images' [images, captions, words, regions] scores: small enough to stay in cache while
# every elementwise step runs over it (passes over the whole batch are bound by memory bandwidth).
_BLOCK_ELEMENTS = 1 << 18


def uses_region_gram(caption_words: int, regions: int, width: int) -> bool:
    """Whether the context norms are cheaper through the regions' Gram matrix G = R R^T than through the context
    vectors c = A R (multiply-adds per image, forward and backward: 2 n r^2 + 2 r^2 d against 3 n r d, n caption
    words, r regions, d width). True for small grids (r < d)."""
    return 2 * caption_words * regions**2 + 2 * regions**2 * width < 3 * caption_words * regions * width


def _score_block(
    flat_words: torch.Tensor,
    word_mask: torch.Tensor,
    block_regions: torch.Tensor,
    attention_temperature: float,
    gram: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward pass for a block of b images against every caption word.

    Args:
        flat_words: [captions * words, P]; word_mask: [captions, words]; block_regions: [b, regions, P].

    Returns (scores w . r [b, captions, words, regions], softmax over words, attention over regions (both the
    scores' shape), and per caption word either its context c = A R [b, captions * words, P] or, with `gram`,
    its row of A G, G = R R^T [b, captions * words, regions]).
    """
    captions, words = word_mask.shape
    scores = torch.matmul(flat_words, block_regions.transpose(1, 2)).view(-1, captions, words, block_regions.shape[1])
    over_words, attention = _softmaxes_over_words_then_regions(scores, word_mask, attention_temperature)
    flat_attention = attention.view(scores.shape[0], captions * words, -1)
    if gram:
        context = torch.bmm(flat_attention, block_regions @ block_regions.transpose(1, 2))
    else:
        context = torch.bmm(flat_attention, block_regions)
    return scores, over_words, attention, context


class _CaptionImageScores(torch.autograd.Function):
    """`caption_image_scores` with a hand-written backward, a block of images at a time.

    Only the matrix products the loss needs are formed (two forward, four backward); the softmaxes are recomputed
    block by block in the backward pass. Saved for backward: small [images, captions, words] tensors and, unless
    `recompute`, the word-region scores and the per-word context (then the backward pass recomputes a block's
    scores and context: two more products, memory independent of the batch).
    """

    @staticmethod
    def forward(ctx, word_embeds, word_mask, region_embeds, attention_temperature, word_temperature, recompute):
        captions, words, width = word_embeds.shape
        images, regions, _ = region_embeds.shape
        gram = uses_region_gram(captions * words, regions, width)
        block = max(1, _BLOCK_ELEMENTS // (captions * words * regions))
        flat_words = word_embeds.reshape(captions * words, width)
        word_context_dot = word_embeds.new_empty(images, captions, words)
        context_norm = word_embeds.new_empty(images, captions * words)
        blocks = []
        with torch.autocast(word_embeds.device.type, enabled=False):
            for start in range(0, images, block):
                rows = slice(start, start + block)
                scores, _, attention, context = _score_block(
                    flat_words, word_mask, region_embeds[rows], attention_temperature, gram
                )
                torch.linalg.vecdot(attention, scores, out=word_context_dot[rows])
                if gram:  # |c|^2 = a^T G a
                    torch.linalg.vecdot(context, attention.view_as(context), out=context_norm[rows])
                    context_norm[rows].clamp_min_(0).sqrt_()
                else:
                    torch.linalg.vector_norm(context, dim=-1, out=context_norm[rows])
                if not recompute:
                    blocks.append((scores, context))
            context_norm = context_norm.view(images, captions, words)
            word_norm = word_embeds.norm(dim=-1)
            cosine = word_context_dot / (word_norm * context_norm).clamp_min(COSINE_EPS)
            weighted = (word_temperature * cosine).masked_fill(~word_mask, float("-inf"))
            result = torch.logsumexp(weighted, dim=-1)  # [images, captions]
        saved_blocks = [tensor for pair in blocks for tensor in pair]
        ctx.save_for_backward(
            word_embeds, word_mask, region_embeds, context_norm, word_norm, cosine, weighted, result, *saved_blocks
        )
        ctx.attention_temperature, ctx.word_temperature = attention_temperature, word_temperature
        ctx.gram, ctx.block = gram, block
        return result.T

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_scores):
        word_embeds, word_mask, region_embeds, context_norm, word_norm, cosine, weighted, result, *saved_blocks = (
            ctx.saved_tensors
        )
        captions, words, width = word_embeds.shape
        images, regions, _ = region_embeds.shape
        flat_words = word_embeds.reshape(captions * words, width)
        tiny = torch.finfo(word_embeds.dtype).tiny
        with torch.autocast(word_embeds.device.type, enabled=False):
            # s = logsumexp_w(t2 cos_w), cos = (w . c) / max(|w| |c|, eps)
            softmax_words = (weighted - result[..., None]).exp()
            grad_cosine = grad_scores.T.contiguous()[..., None] * ctx.word_temperature * softmax_words
            denominator = word_norm * context_norm
            grad_dot = grad_cosine / denominator.clamp_min(COSINE_EPS)  # [images, captions, words]
            grad_by_norms = torch.where(denominator > COSINE_EPS, -grad_cosine * cosine, 0.0)
            # d|c| / |c| per caption word [images, captions * words, 1], and d|w| / |w| summed over images
            norm_scale = (grad_by_norms / context_norm.square().clamp_min(tiny)).view(images, -1, 1)
            grad_word_norm = (grad_by_norms / word_norm.square().clamp_min(tiny)).sum(dim=0)  # [captions, words]
            grad_words = (grad_word_norm[..., None] * word_embeds).reshape(captions * words, width)
            grad_regions = torch.empty_like(region_embeds)
            for index, start in enumerate(range(0, images, ctx.block)):
                rows = slice(start, start + ctx.block)
                block_regions, block_grad_dot, block_norm_scale = region_embeds[rows], grad_dot[rows], norm_scale[rows]
                if saved_blocks:
                    scores, context = saved_blocks[2 * index : 2 * index + 2]
                    over_words, attention = _softmaxes_over_words_then_regions(
                        scores, word_mask, ctx.attention_temperature
                    )
                else:
                    scores, over_words, attention, context = _score_block(
                        flat_words, word_mask, block_regions, ctx.attention_temperature, ctx.gram
                    )
                flat_attention = attention.view(-1, captions * words, regions)
                # the attention a enters w . c = sum_r a_r (w . r) and |c|
                grad_attention = (block_grad_dot[..., None] * scores).view_as(flat_attention)
                if ctx.gram:  # |c| = sqrt(a^T G a): d|c|/da = (A G)_w / |c|, d|c|/dG = a a^T / (2 |c|), G = R R^T
                    grad_attention.addcmul_(block_norm_scale, context)
                    grad_gram = torch.bmm(flat_attention.transpose(1, 2), block_norm_scale * flat_attention)
                    context_products = (grad_gram, block_regions)
                else:  # d|c|/dc = c / |c|, c = A R
                    grad_context = block_norm_scale * context
                    grad_attention.baddbmm_(grad_context, block_regions.transpose(1, 2))
                    context_products = (flat_attention.transpose(1, 2), grad_context)
                grad_over_words = _softmax_backward(grad_attention.view_as(attention), attention, -1, attention.dtype)
                grad_block_scores = _softmax_backward(
                    grad_over_words.mul_(ctx.attention_temperature), over_words, -2, attention.dtype
                ).addcmul_(block_grad_dot[..., None], attention)
                flat_grad_scores = grad_block_scores.view_as(flat_attention)
                for image_grad_scores, image_regions in zip(flat_grad_scores, block_regions):
                    grad_words.addmm_(image_grad_scores, image_regions)
                torch.matmul(flat_grad_scores.transpose(1, 2), flat_words, out=grad_regions[rows])
                grad_regions[rows].baddbmm_(*context_products)
        return grad_words.view_as(word_embeds), None, grad_regions, None, None, None


def caption_image_scores(
    word_embeds: torch.Tensor,
    word_mask: torch.Tensor,
    region_embeds: torch.Tensor,
    attention_temperature: float,
    word_temperature: float,
    recompute: bool = False,
) -> torch.Tensor:
    """GLoRIA's caption-image score s_ci = log sum_w exp(temp2 * cos(w, c_w)), c_w the word's attended context.

    Args:
        word_embeds: [captions, words, P]; word_mask: [captions, words].
        region_embeds: [images, regions, P].
        recompute: keep nothing of size images x captions x words x regions for the backward pass (it recomputes
            them a block of images at a time).

    Returns [captions, images], in the inputs' precision even under autocast. The word-context dot products reuse
    the word-region scores (w . c_w = sum_r a_wr (w . r)); the context vectors are needed only for their norms,
    which small grids take from the regions' Gram matrix instead.
    """
    return _CaptionImageScores.apply(
        word_embeds, word_mask, region_embeds, attention_temperature, word_temperature, recompute
    )


def chunked_caption_image_scores(
    word_embeds: torch.Tensor,
    word_mask: torch.Tensor,
    region_embeds: torch.Tensor,
    attention_temperature: float,
    word_temperature: float,
    chunk_size: int,
) -> torch.Tensor:
    """`caption_image_scores` a chunk of captions at a time: [captions, images].

    With more than one chunk, each chunk recomputes its scores in the backward pass, so memory grows with
    chunk_size x images, not captions x images.
    """
    captions = word_embeds.shape[0]
    chunk_size = chunk_size if chunk_size > 0 else captions
    recompute = chunk_size < captions
    chunks = [
        caption_image_scores(
            word_embeds[start : start + chunk_size],
            word_mask[start : start + chunk_size],
            region_embeds,
            attention_temperature,
            word_temperature,
            recompute,
        )
        for start in range(0, captions, chunk_size)
    ]
    return torch.cat(chunks)


def local_contrastive_loss(
    word_embeds: torch.Tensor,
    word_mask: torch.Tensor,
    region_embeds: torch.Tensor,
    attention_temperature: float,
    word_temperature: float,
    logits_temperature: float,
    chunk_size: int = 0,
) -> torch.Tensor:
    """GLoRIA local loss: symmetric CE over temp3 * s, s from `caption_image_scores` for every caption-image pair
    of the global batch.

    Args:
        word_embeds: [batch, words, P]; word_mask: [batch, words]; region_embeds: [batch, regions, P]. Caption i
            describes image i. A pair whose caption has no words is left out (neither query nor candidate).
        chunk_size: captions scored at once (0 = all), see `chunked_caption_image_scores`.

    With several processes, words and regions are gathered with gradient (words padded to the longest caption);
    each process scores its own images against all captions and its own captions against all images, and
    `global_mean` makes the average over processes the loss of the whole global batch.
    """
    has_words = word_mask.any(dim=1)
    # A caption without words gets one dummy word so every score stays finite; its score is then masked out.
    safe_mask = word_mask.clone()
    safe_mask[:, 0] |= ~has_words
    scores = partial(
        chunked_caption_image_scores,
        attention_temperature=attention_temperature,
        word_temperature=word_temperature,
        chunk_size=chunk_size,
    )
    if not several_processes():
        caption_rows = scores(word_embeds, safe_mask, region_embeds)  # [captions, images]
        image_rows, all_has_words, offset = caption_rows.T, has_words, 0
    else:
        longest = torch.tensor(word_embeds.shape[1], device=word_embeds.device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        padding = int(longest) - word_embeds.shape[1]
        all_words, offset = gather_with_grad(F.pad(word_embeds, (0, 0, 0, padding)))
        all_masks, _ = gather_with_grad(F.pad(safe_mask, (0, padding)))
        all_has_words, _ = gather_with_grad(has_words)
        all_regions, _ = gather_with_grad(region_embeds)
        caption_rows = scores(word_embeds, safe_mask, all_regions)  # [local captions, all images]
        image_rows = scores(all_words, all_masks, region_embeds).T  # [local images, all captions]
    labels = torch.arange(word_embeds.shape[0], device=word_embeds.device) + offset
    absent = ~all_has_words[None, :]  # pairs without words are neither candidates nor queries
    image_logits = (logits_temperature * image_rows.masked_fill(absent, float("-inf")))[has_words]
    caption_logits = (logits_temperature * caption_rows.masked_fill(absent, float("-inf")))[has_words]
    per_pair = torch.zeros_like(has_words, dtype=image_rows.dtype)
    per_pair[has_words] = (
        F.cross_entropy(image_logits, labels[has_words], reduction="none")
        + F.cross_entropy(caption_logits, labels[has_words], reduction="none")
    ) / 2
    return global_mean(per_pair, has_words)


def report_type_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE(logits, y) averaged over the samples of the global batch whose type is known (y != UNKNOWN_REPORT_TYPE);
    0 when none is known.

    logits: [batch, K] (raw logits, never probabilities); labels: [batch].
    """
    known = labels != UNKNOWN_REPORT_TYPE
    per_row = F.cross_entropy(logits.float(), labels.masked_fill(~known, 0), reduction="none")
    return global_mean(per_row, known)


def load_balancing_loss(router_logits: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance loss K * sum_k f_k * P_k (1 when perfectly balanced).

    f_k: share of samples sent to expert k; P_k: mean router probability of expert k. router_logits: [batch, K].
    """
    num_experts = router_logits.shape[-1]
    share_routed = torch.bincount(expert_index, minlength=num_experts).to(router_logits.dtype) / expert_index.numel()
    mean_probability = router_logits.softmax(dim=-1).mean(dim=0)
    return num_experts * (share_routed * mean_probability).sum()
