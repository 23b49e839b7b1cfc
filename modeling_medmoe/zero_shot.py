# Copyright 2026 The MedMoE Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file except in compliance with
# the License. You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software distributed under the License is distributed on
# an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the
# specific language governing permissions and limitations under the License.
"""Zero-shot classification: class names become prompts, prompts become class embeddings, images are scored
against them. Defined once here; the evaluation, the model card's examples, the endpoint handler and the demo call
it (through `MedMoEModel.get_zero_shot_class_embeddings` and `MedMoEModel.zero_shot_probabilities` where only the
saved model folder is at hand).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .limits import InputLimits

# Each class name fills every template; the class embedding is the normalised mean of the prompts' embeddings.
# The first is the one to give APIs that take a single template (the pipeline's hypothesis_template).
DEFAULT_PROMPT_TEMPLATES = ("A medical image: {}.", "{}.", "A {} image.", "This is a {}.", "{} study.")


def check_template(template) -> str:
    """A prompt template must be plain text holding `{}` exactly once, where the class name goes (no other braces:
    it is filled by replacing `{}`, never by `str.format`, so a template cannot ask for work or other fields)."""
    if not isinstance(template, str):
        raise ValueError(f"A prompt template must be a string; got {type(template).__name__}.")
    if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
        raise ValueError(f"A prompt template is plain text with {{}} once where the class name goes; got {template!r}.")
    return template


def class_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class name, class-major: [C * T] prompts."""
    for template in templates:
        check_template(template)
    if not class_names:
        raise ValueError("Zero-shot classification needs at least one class name.")
    return [template.replace("{}", name) for name in class_names for template in templates]


def zero_shot_request(candidate_labels, hypothesis_template, limits: InputLimits) -> tuple[list[str], list[str]]:
    """(labels, templates) of a zero-shot request, checked before any work: labels as a list of strings or one
    comma-separated string; the template plain text with one {} (None: the default templates); counts and lengths
    within `limits`."""
    if isinstance(candidate_labels, str):
        candidate_labels = [label.strip() for label in candidate_labels.split(",") if label.strip()]
    if not isinstance(candidate_labels, (list, tuple)):
        raise ValueError("candidate_labels must be a list of strings or one comma-separated string.")
    limits.check("max_candidate_labels", len(candidate_labels), "The number of candidate labels")
    labels = []
    for label in candidate_labels:
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"Every candidate label must be a non-empty string; got {label!r}.")
        limits.check("max_label_characters", len(label), "A candidate label's length in characters")
        labels.append(label.strip())
    if not labels:
        raise ValueError("Zero-shot classification needs at least one candidate label.")
    if hypothesis_template is None:
        return labels, list(DEFAULT_PROMPT_TEMPLATES)
    check_template(hypothesis_template)
    limits.check("max_template_characters", len(hypothesis_template), "The hypothesis template's length")
    return labels, [hypothesis_template]


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
    return (torch.as_tensor(logit_scale, device=cosine.device) * cosine).softmax(dim=-1)
