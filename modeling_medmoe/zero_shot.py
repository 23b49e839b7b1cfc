"""Zero-shot classification: class names become prompts, prompts become class embeddings, images are scored
against them. Defined once here; the evaluation, the model card's examples, the endpoint handler and the demo call
it (through `MedMoEModel.get_zero_shot_class_embeddings` and `MedMoEModel.zero_shot_probabilities` where only the
saved model folder is at hand).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Each class name fills every template; the class embedding is the normalised mean of the prompts' embeddings.
# The first is the one to give APIs that take a single template (the pipeline's hypothesis_template).
DEFAULT_PROMPT_TEMPLATES = ("A medical image: {}.", "{}.", "A {} image.", "This is a {}.", "{} study.")


def class_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class name, class-major: [C * T] prompts."""
    for template in templates:
        if "{}" not in template:
            raise ValueError(f"A prompt template needs {{}} where the class name goes; got {template!r}.")
    if not class_names:
        raise ValueError("Zero-shot classification needs at least one class name.")
    return [template.format(name) for name in class_names for template in templates]


@torch.no_grad()
def zero_shot_class_embeddings(
    model, tokenizer, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_PROMPT_TEMPLATES
) -> torch.Tensor:
    """One L2-normalised embedding per class, [C, P]: the normalised mean of its prompts' normalised embeddings.

    `model` is anything with `get_text_features(input_ids, attention_mask).pooler_output` and parameters (a
    MedMoEModel, or a wrapper of another CLIP-style model); `tokenizer` is its (fast) tokenizer.
    """
    templates = list(templates)
    prompts = class_prompts(class_names, templates)
    encoding = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
    device = next(model.parameters()).device
    prompt_embeds = model.get_text_features(
        input_ids=encoding["input_ids"].to(device), attention_mask=encoding["attention_mask"].to(device)
    ).pooler_output
    per_class = F.normalize(prompt_embeds.float(), dim=-1).view(len(class_names), len(templates), -1)
    return F.normalize(per_class.mean(dim=1), dim=-1)


def zero_shot_probabilities(
    image_embeds: torch.Tensor, class_embeds: torch.Tensor, logit_scale: float | torch.Tensor
) -> torch.Tensor:
    """softmax over classes of logit_scale * cos(image, class): image_embeds [N, P], class_embeds [C, P] -> [N, C]."""
    cosine = F.normalize(image_embeds.float(), dim=-1) @ class_embeds.float().to(image_embeds.device).T
    return (logit_scale * cosine).softmax(dim=-1)
