"""MedMoE training losses: global InfoNCE, GLoRIA local word-region loss, routing losses.

Every contrastive loss is symmetric: the mean of the image->text and text->image cross-entropies.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .report_types import UNKNOWN_REPORT_TYPE

COSINE_EPS = 1e-8


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate `tensor` [n, ...] from every process, keeping the gradient, and give this process's row offset.

    Without an initialised process group (one process) it returns the tensor itself and offset 0. All processes
    must pass the same shape.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor, 0
    gathered = torch.distributed.nn.functional.all_gather(tensor)
    return torch.cat(gathered), dist.get_rank() * tensor.shape[0]


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
    word_region_scores: torch.Tensor, word_mask: torch.Tensor, attention_temperature: float, word_dim: int = -2
) -> torch.Tensor:
    """GLoRIA's attention of words over regions: softmax_regions(temp1 * softmax_words(w . r)).

    Args:
        word_region_scores: dot products w . r, [..., words, regions] (words at `word_dim`, regions last).
        word_mask: [..., words] (broadcastable), True for real words.

    Returns the scores' shape; each real word's attention sums to 1 over regions.
    """
    masked = word_region_scores.masked_fill(~word_mask.unsqueeze(-1), torch.finfo(word_region_scores.dtype).min)
    over_words = masked.softmax(dim=word_dim)
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
    attention = word_region_attention(word_region, word_mask.unsqueeze(0), attention_temperature, word_dim=-2)
    word_context_dot = (attention * word_region).sum(dim=-1)  # [images, captions, words]
    context = torch.bmm(attention.flatten(1, 2), region_embeds)  # [images, captions * words, P]
    context_norm = context.norm(dim=-1).view_as(word_context_dot)
    cosine = word_context_dot / (word_embeds.norm(dim=-1) * context_norm).clamp_min(COSINE_EPS)
    weighted = (word_temperature * cosine).masked_fill(~word_mask, float("-inf"))
    return torch.logsumexp(weighted, dim=-1).T


def local_contrastive_loss(
    word_embeds: torch.Tensor,
    word_mask: torch.Tensor,
    region_embeds: torch.Tensor,
    attention_temperature: float = 4.0,
    word_temperature: float = 5.0,
    logits_temperature: float = 10.0,
    chunk_size: int = 0,
) -> torch.Tensor:
    """GLoRIA local loss: symmetric CE over temp3 * s, s from `caption_image_scores` for every caption-image pair.

    Args:
        word_embeds: [batch, words, P]; word_mask: [batch, words]; region_embeds: [batch, regions, P]. Caption i
            describes image i. Pairs whose caption has no word are left out.
        chunk_size: captions scored at once (0 = all). With gradients on, each chunk is recomputed in the backward
            pass (activation checkpointing), so memory grows with chunk_size x batch, not batch^2.
    """
    has_words = word_mask.any(dim=1)
    if not bool(has_words.all()):
        word_embeds, word_mask, region_embeds = word_embeds[has_words], word_mask[has_words], region_embeds[has_words]
    batch = word_embeds.shape[0]
    if batch == 0:
        return word_embeds.sum() * 0.0
    chunk_size = chunk_size if chunk_size > 0 else batch
    recompute = torch.is_grad_enabled() and chunk_size < batch
    score_chunks = []
    for start in range(0, batch, chunk_size):
        args = (
            word_embeds[start : start + chunk_size],
            word_mask[start : start + chunk_size],
            region_embeds,
            attention_temperature,
            word_temperature,
        )
        score_chunks.append(
            checkpoint(caption_image_scores, *args, use_reentrant=False) if recompute else caption_image_scores(*args)
        )
    logits_per_image = logits_temperature * torch.cat(score_chunks).T  # [images, captions]
    labels = torch.arange(batch, device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


def report_type_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE(logits, y) over the samples whose type is known (y != UNKNOWN_REPORT_TYPE); 0 when none is known.

    logits: [batch, K] (raw logits, never probabilities); labels: [batch].
    """
    known = labels != UNKNOWN_REPORT_TYPE
    if not bool(known.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[known].float(), labels[known])


def load_balancing_loss(router_logits: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance loss K * sum_k f_k * P_k (1 when perfectly balanced).

    f_k: share of samples sent to expert k; P_k: mean router probability of expert k. router_logits: [batch, K].
    """
    num_experts = router_logits.shape[-1]
    share_routed = torch.bincount(expert_index, minlength=num_experts).to(router_logits.dtype) / expert_index.numel()
    mean_probability = router_logits.softmax(dim=-1).mean(dim=0)
    return num_experts * (share_routed * mean_probability).sum()
