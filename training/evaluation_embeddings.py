"""Run a MedMoE model over an evaluation stream and collect embeddings, routing and ground truth.

Images and reports are embedded by separate calls, so an image is never routed by its own report (whatever the
config's `router_input`); the figures computed from them are defined in training/evaluation_metrics.py.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "word_ids", "pixel_values")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


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
def embed_pairs(
    model, dataloader, device: torch.device, description: str = "embedding", show_progress=True, image_encoder=None
):
    """Embed every image-report pair of `dataloader` (batches from `data.BatchStream`) with `model` in eval mode;
    the images with `image_encoder` when given (`modeling_medmoe.ImageEncoder`: e.g. on the folder's ONNX export),
    else with `model(pixel_values=...)`."""
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {"image_embeds": [], "text_embeds": [], "expert_index": [], "report_type_labels": []}
    texts, metadata, skipped = [], {}, Counter()
    progress = tqdm(dataloader, desc=description, unit="batch", disable=not show_progress, leave=False)
    for batch in progress:
        skipped.update(batch["skipped"])
        if "pixel_values" not in batch:
            continue
        if image_encoder is not None:
            image_embeds, expert_index = image_encoder(batch["pixel_values"])
            image_embeds = torch.nn.functional.normalize(image_embeds, dim=-1)
        else:
            image = model(pixel_values=batch["pixel_values"].to(device))
            image_embeds, expert_index = image.image_embeds.float().cpu(), image.expert_index.cpu()
        text = model(**{key: batch[key].to(device) for key in TEXT_INPUTS if key in batch})
        parts["image_embeds"].append(image_embeds)
        parts["text_embeds"].append(text.text_embeds.float().cpu())
        parts["expert_index"].append(expert_index)
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
