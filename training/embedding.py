"""Run a MedMoE model over an evaluation stream and collect embeddings, routing and ground truth."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "word_ids", "pixel_values")


@dataclass
class EmbeddedSet:
    """Everything evaluation needs about a set of image-report pairs (N rows, P = projection dim).

    image_embeds, text_embeds: [N, P] L2-normalised; expert_index, report_type_labels: [N]; texts: N reports;
    metadata: ground-truth columns (e.g. "modality", "finding_box"), each a list of N values.
    """

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    expert_index: torch.Tensor
    report_type_labels: torch.Tensor
    texts: list[str]
    metadata: dict[str, list] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)


def model_inputs(batch: dict, device: torch.device) -> dict:
    return {key: batch[key].to(device) for key in MODEL_INPUTS if key in batch}


@torch.no_grad()
def embed_pairs(model, dataloader, device: torch.device, description: str = "embedding", show_progress=True):
    """Embed every image-report pair of `dataloader` (batches from `data.BatchStream`) with `model` in eval mode."""
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {"image_embeds": [], "text_embeds": [], "expert_index": [], "report_type_labels": []}
    texts, metadata, skipped = [], {}, Counter()
    progress = tqdm(dataloader, desc=description, unit="batch", disable=not show_progress, leave=False)
    for batch in progress:
        skipped.update(batch["skipped"])
        if "pixel_values" not in batch:
            continue
        out = model(**model_inputs(batch, device))
        parts["image_embeds"].append(out.image_embeds.float().cpu())
        parts["text_embeds"].append(out.text_embeds.float().cpu())
        parts["expert_index"].append(out.expert_index.cpu())
        parts["report_type_labels"].append(batch["report_type_labels"])
        texts.extend(batch["texts"])
        for key, values in batch["metadata"].items():
            metadata.setdefault(key, []).extend(values)
    model.train(was_training)
    if not texts:
        raise ValueError(
            "The evaluation stream gave no usable rows" + (f" (skipped: {dict(skipped)})." if skipped else ".")
        )
    return EmbeddedSet(
        **{key: torch.cat(value) for key, value in parts.items()}, texts=texts, metadata=metadata, skipped=skipped
    )


def retrieval_ranks(query_embeds: torch.Tensor, candidate_embeds: torch.Tensor) -> torch.Tensor:
    """1-based rank of the true candidate (same row) for each query, by cosine similarity. [N, P] x2 -> [N].

    Ties count against the query (a tie with the true candidate ranks it after the tied ones): a pessimistic bound.
    """
    similarity = F.normalize(query_embeds, dim=-1) @ F.normalize(candidate_embeds, dim=-1).T
    true_scores = similarity.diagonal().unsqueeze(1)
    return (similarity >= true_scores).sum(dim=1)


def recall_at_k(ranks: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    return {f"R@{k}": float((ranks <= k).float().mean()) for k in ks}


def routing_purity(expert_index: torch.Tensor, classes: list) -> float:
    """Share of samples whose expert's most common class is their own class (1 = each expert serves one class)."""
    by_expert: dict[int, Counter] = {}
    for expert, label in zip(expert_index.tolist(), classes):
        by_expert.setdefault(expert, Counter())[label] += 1
    return sum(counts.most_common(1)[0][1] for counts in by_expert.values()) / max(len(classes), 1)
