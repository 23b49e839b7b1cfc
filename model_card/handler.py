"""Hugging Face Inference Endpoints handler for a MedMoE folder (copied into every saved model folder).

Requests (JSON):
    {"inputs": IMAGE, "parameters": {"candidate_labels": ["chest x-ray", "brain mri"],
                                     "hypothesis_template": "A medical image: {}."}}
        -> [{"label": ..., "score": ...}, ...] sorted by score (zero-shot classification; without
           "hypothesis_template", the model's own prompt templates, averaged)
    {"inputs": IMAGE or [IMAGE, ...], "parameters": {"mode": "image-embedding"}}
        -> {"embeddings": [[...]], "experts": ["CT", ...]}
    {"inputs": "report text" or ["...", ...], "parameters": {"mode": "text-embedding"}}
        -> {"embeddings": [[...]]}
IMAGE is a PIL image, the raw bytes of an image or DICOM file, or their base64 string (optionally a data URL).
For DICOM, "parameters" may also hold "window" (a CT preset: lung, mediastinum, bone, brain, abdomen, or
[centre, width]) and "frame" (of a multi-frame file; default the middle one). A bad request, an undecodable image or
DICOM included, returns {"error": "..."} saying what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoModel, AutoProcessor

MODES = ("zero-shot", "image-embedding", "text-embedding")
DICOM_MAGIC_OFFSET = 128  # a DICOM file: a 128-byte preamble, then b"DICM"


class BadRequest(ValueError):
    """The request cannot be served; the message says why."""


def read_image(value: Any) -> Image.Image | bytes:
    """A PIL image from a PIL image, bytes or a base64 string (data URLs accepted); DICOM file bytes stay bytes (the
    model's image processor reads them)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, str):
        payload = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            value = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("An image string must be base64 (or a data URL).") from None
    if isinstance(value, (bytes, bytearray)):
        if bytes(value[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4]) == b"DICM":
            return bytes(value)
        try:
            image = Image.open(io.BytesIO(value))
            image.load()
            return image
        except (UnidentifiedImageError, OSError) as error:
            raise BadRequest(f"The image bytes could not be decoded ({error}).") from None
    raise BadRequest(f"Unsupported image input of type {type(value).__name__}; send bytes or base64.")


class EndpointHandler:
    def __init__(self, path: str = ""):
        self.model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)

    def __call__(self, data: dict[str, Any]) -> list[dict] | dict:
        try:
            if not isinstance(data, dict) or "inputs" not in data:
                raise BadRequest('The request must be a JSON object with "inputs".')
            parameters = data.get("parameters") or {}
            mode = parameters.get("mode", "zero-shot")
            if mode not in MODES:
                raise BadRequest(f"Unknown mode {mode!r}; use one of {', '.join(MODES)}.")
            if mode == "zero-shot":
                return self.zero_shot(data["inputs"], parameters)
            if mode == "image-embedding":
                return self.image_embeddings(data["inputs"], parameters)
            return self.text_embeddings(data["inputs"])
        except BadRequest as error:
            return {"error": str(error)}

    def pixel_values(self, images: list, parameters: dict) -> torch.Tensor:
        """The model's image processor on these images, with the request's DICOM `window` and `frame`."""
        try:
            return self.processor.image_processor(
                images=images, window=parameters.get("window"), frame=parameters.get("frame")
            )["pixel_values"]
        except (ValueError, TypeError, ImportError) as error:
            raise BadRequest(str(error)) from None

    @torch.no_grad()
    def zero_shot(self, inputs: Any, parameters: dict) -> list[dict]:
        image = read_image(inputs)
        labels = parameters.get("candidate_labels")
        if isinstance(labels, str):
            labels = [label.strip() for label in labels.split(",") if label.strip()]
        if not labels or not all(isinstance(label, str) for label in labels):
            raise BadRequest('Zero-shot needs "parameters": {"candidate_labels": [...]} with at least one label.')
        template = parameters.get("hypothesis_template")
        if template is not None and (not isinstance(template, str) or "{}" not in template):
            raise BadRequest('"hypothesis_template" must contain {} where the label goes.')
        image_embeds = self.model.get_image_features(pixel_values=self.pixel_values([image], parameters)).pooler_output
        tokenizer = self.processor.tokenizer
        if template is None:
            class_embeds = self.model.get_zero_shot_class_embeddings(tokenizer, labels)
        else:
            class_embeds = self.model.get_zero_shot_class_embeddings(tokenizer, labels, [template])
        scores = self.model.zero_shot_probabilities(image_embeds, class_embeds)[0].tolist()
        return sorted(
            ({"label": label, "score": score} for label, score in zip(labels, scores)), key=lambda x: -x["score"]
        )

    @torch.no_grad()
    def image_embeddings(self, inputs: Any, parameters: dict) -> dict:
        images = [read_image(value) for value in (inputs if isinstance(inputs, list) else [inputs])]
        if not images:
            raise BadRequest("No image given.")
        out = self.model(pixel_values=self.pixel_values(images, parameters))
        experts = [self.model.config.expert_names[index] for index in out.expert_index.tolist()]
        return {"embeddings": out.image_embeds.tolist(), "experts": experts}

    @torch.no_grad()
    def text_embeddings(self, inputs: Any) -> dict:
        texts = [inputs] if isinstance(inputs, str) else inputs
        if (
            not isinstance(texts, list)
            or not texts
            or not all(isinstance(text, str) and text.strip() for text in texts)
        ):
            raise BadRequest('Text embeddings need "inputs" as a non-empty string or a list of them.')
        batch = self.processor(text=texts, padding=True, truncation=True)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return {"embeddings": out.text_embeds.tolist()}
