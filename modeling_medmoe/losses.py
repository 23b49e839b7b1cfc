"""MedMoE training losses: global InfoNCE, GLoRIA local word-region loss, routing losses.

Every contrastive loss is symmetric: the mean of the image->text and text->image cross-entropies.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .report_types import UNKNOWN_REPORT_TYPE

COSINE_EPS = 1e-8


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate `tensor` [n, ...] from every process, keeping the gradient, and give this process's row offset.

    Without an initialised process group (one process) it returns the tensor itself and offset 0. All processes
    must pass the same shape.
    """
    if not is_distributed():
        return tensor, 0
    gathered = torch.distributed.nn.functional.all_gather(tensor)
    return torch.cat(gathered), dist.get_rank() * tensor.shape[0]


def global_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The mean of `values[keep]` over ALL processes' rows, scaled so that the average over processes of what each
    returns is that global mean (gradients averaged by DDP are then the gradients of the global mean).

    values: [n] per-row losses; keep: [n] bool. Returns 0 (with a graph) when no process keeps a row.
    """
    kept_sum = values.masked_fill(~keep, 0.0).sum()
    count = keep.sum().to(values.dtype)
    scale = 1.0
    if is_distributed():
        count = count.detach().clone()
        dist.all_reduce(count)
        scale = dist.get_world_size()
    return kept_sum * scale / count.clamp_min(1.0)


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


def word_region_attention(
    word_region_scores: torch.Tensor, word_mask: torch.Tensor, attention_temperature: float
) -> torch.Tensor:
    """GLoRIA's attention of words over regions: softmax_regions(temp1 * softmax_words(w . r)).

    Args:
        word_region_scores: dot products w . r, [..., words, regions].
        word_mask: [..., words] (broadcastable), True for real words.

    Returns the scores' shape; each real word's attention sums to 1 over regions.
    """
    masked = word_region_scores.masked_fill(~word_mask.unsqueeze(-1), torch.finfo(word_region_scores.dtype).min)
    over_words = masked.softmax(dim=-2)
    return (attention_temperature * over_words).softmax(dim=-1)


def caption_image_scores(
    word_embeds: torch.Tensor,
    word_mask: torch.Tensor,
    region_embeds: torch.Tensor,
    attention_temperature: float,
    word_temperature: float,
) -> torch.Tensor:
    """GLoRIA's caption-image score s_ci = log sum_w exp(temp2 * cos(w, c_w)), c_w the word's attended context.

    Args:
        word_embeds: [captions, words, P]; word_mask: [captions, words].
        region_embeds: [images, regions, P].

    Returns [captions, images]. Everything is laid out [images, captions, words, regions] so that every step is a
    contiguous batched matmul or reduction. The word-context dot products reuse the word-region scores
    (w . c_w = sum_r a_wr (w . r)), so the context vectors are formed only for their norms.
    """
    captions, words, width = word_embeds.shape
    word_region = torch.matmul(word_embeds.reshape(captions * words, width), region_embeds.transpose(1, 2))
    word_region = word_region.view(region_embeds.shape[0], captions, words, -1)  # [images, captions, words, regions]
    attention = word_region_attention(word_region, word_mask.unsqueeze(0), attention_temperature)
    word_context_dot = (attention * word_region).sum(dim=-1)  # [images, captions, words]
    context = torch.bmm(attention.flatten(1, 2), region_embeds)  # [images, captions * words, P]
    context_norm = context.norm(dim=-1).view_as(word_context_dot)
    cosine = word_context_dot / (word_embeds.norm(dim=-1) * context_norm).clamp_min(COSINE_EPS)
    weighted = (word_temperature * cosine).masked_fill(~word_mask, float("-inf"))
    return torch.logsumexp(weighted, dim=-1).T


def chunked_caption_image_scores(
    word_embeds: torch.Tensor,
    word_mask: torch.Tensor,
    region_embeds: torch.Tensor,
    attention_temperature: float,
    word_temperature: float,
    chunk_size: int,
) -> torch.Tensor:
    """`caption_image_scores` a chunk of captions at a time: [captions, images].

    With gradients on and more than one chunk, each chunk is recomputed in the backward pass (activation
    checkpointing), so memory grows with chunk_size x images, not captions x images.
    """
    captions = word_embeds.shape[0]
    chunk_size = chunk_size if chunk_size > 0 else captions
    recompute = torch.is_grad_enabled() and chunk_size < captions
    chunks = []
    for start in range(0, captions, chunk_size):
        args = (
            word_embeds[start : start + chunk_size],
            word_mask[start : start + chunk_size],
            region_embeds,
            attention_temperature,
            word_temperature,
        )
        chunks.append(
            checkpoint(caption_image_scores, *args, use_reentrant=False) if recompute else caption_image_scores(*args)
        )
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
    if not is_distributed():
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
