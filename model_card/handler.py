"""Hugging Face Inference Endpoints handler for a MedMoE folder (copied into every saved model folder).

Requests (JSON):
    {"inputs": IMAGE, "parameters": {"candidate_labels": ["chest x-ray", "brain mri"],
                                     "hypothesis_template": "A medical image: {}."}}
        -> [{"label": ..., "score": ...}, ...] sorted by score (zero-shot classification; without
           "hypothesis_template", the model's own prompt templates, averaged)
    {"inputs": IMAGE or [IMAGE, ...], "parameters": {"mode": "image-embedding"}}
        -> {"embeddings": [[...]], "experts": ["CT", ...], "backend": "torch" or "onnx-fp32" / "onnx-int8"}
    {"inputs": "report text" or ["...", ...], "parameters": {"mode": "text-embedding"}}
        -> {"embeddings": [[...]]}
IMAGE is a PIL image, the raw bytes of an image or DICOM file, or their base64 string (optionally a data URL).
For DICOM, "parameters" may also hold "window" (a CT preset: lung, mediastinum, bone, brain, abdomen, or
[centre, width]) and "frame" (of a multi-frame file; default the middle one). A bad request returns
{"error": "..."} saying what was wrong; nothing a request holds raises out of the handler.

Limits (the model folder's `input_limits` in preprocessor_config.json; defaults in modeling_medmoe/limits.py): an
image or DICOM file at most 64 MiB as sent, 40M pixels per image or DICOM frame (read from the header, before
decoding), 1,000 DICOM frames (one is decoded), 64 images or 256 texts of at most 20,000 characters per request,
100 candidate labels of at most 200 characters, a template of at most 300 characters that is plain text with {}
once (filled by replacement, never by str.format). A request above a limit is refused before any decoding or
embedding.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import logging
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, AutoProcessor

logger = logging.getLogger(__name__)

MODES = ("zero-shot", "image-embedding", "text-embedding")


class BadRequest(ValueError):
    """The request cannot be served; the message says why."""


def model_code(model, module: str):
    """A module of the model folder's own code (imported beside the model class, as transformers loaded it)."""
    return importlib.import_module(f".{module}", package=type(model).__module__.rpartition(".")[0])


class EndpointHandler:
    def __init__(self, path: str = ""):
        self.model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        self.limits = self.processor.image_processor.limits
        self.zero_shot_request = model_code(self.model, "zero_shot").zero_shot_request
        self.image_encoder = model_code(self.model, "image_encoder").ImageEncoder.for_model(self.model, path)
        self.backend = self.image_encoder.name
        logger.info(f"MedMoE endpoint: image side on {self.backend}.")

    def __call__(self, data: dict[str, Any]) -> list[dict] | dict:
        try:
            if not isinstance(data, dict) or "inputs" not in data:
                raise BadRequest('The request must be a JSON object with "inputs".')
            parameters = data.get("parameters") or {}
            if not isinstance(parameters, dict):
                raise BadRequest('"parameters" must be a JSON object.')
            mode = parameters.get("mode", "zero-shot")
            if not isinstance(mode, str) or mode not in MODES:
                raise BadRequest(f"Unknown mode {mode!r}; use one of {', '.join(MODES)}.")
            if mode == "zero-shot":
                return self.zero_shot(data["inputs"], parameters)
            if mode == "image-embedding":
                return self.image_embeddings(data["inputs"], parameters)
            return self.text_embeddings(data["inputs"])
        except ValueError as error:  # BadRequest, and the processor's and zero-shot checks (InputTooLarge included)
            return {"error": str(error)}

    def read_image(self, value: Any) -> Image.Image | bytes:
        """A PIL image, or the bytes of an image or DICOM file (from bytes, or base64 / a data URL), within the
        size limit; the image processor decodes it, checking its header first."""
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, str):
            payload = value.split(",", 1)[1] if value.startswith("data:") else value
            self.limits.check("max_image_bytes", len(payload) * 3 // 4, "The image's size in bytes")
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest("An image string must be base64 (or a data URL).") from None
        if isinstance(value, (bytes, bytearray)):
            self.limits.check("max_image_bytes", len(value), "The image's size in bytes")
            return bytes(value)
        raise BadRequest(f"Unsupported image input of type {type(value).__name__}; send bytes or base64.")

    def pixel_values(self, images: list, parameters: dict) -> torch.Tensor:
        """The model's image processor on these images, with the request's DICOM `window` and `frame`."""
        window, frame = parameters.get("window"), parameters.get("frame")
        if frame is not None and (not isinstance(frame, int) or isinstance(frame, bool)):
            raise BadRequest(f'"frame" must be an integer; got {frame!r}.')
        if window is not None and not isinstance(window, (str, list)):
            raise BadRequest(f'"window" must be a preset name or [centre, width]; got {window!r}.')
        try:
            return self.processor.image_processor(images=images, window=window, frame=frame)["pixel_values"]
        except (TypeError, ImportError) as error:
            raise BadRequest(str(error)) from None

    @torch.no_grad()
    def zero_shot(self, inputs: Any, parameters: dict) -> list[dict]:
        image = self.read_image(inputs)  # the size checks first: nothing is decoded yet
        labels, templates = self.zero_shot_request(
            parameters.get("candidate_labels"), parameters.get("hypothesis_template"), self.limits
        )
        image_embeds, _ = self.image_encoder(self.pixel_values([image], parameters))
        class_embeds = self.model.get_zero_shot_class_embeddings(self.processor.tokenizer, labels, templates)
        scores = self.model.zero_shot_probabilities(image_embeds, class_embeds)[0].tolist()
        return sorted(
            ({"label": label, "score": score} for label, score in zip(labels, scores)), key=lambda x: -x["score"]
        )

    @torch.no_grad()
    def image_embeddings(self, inputs: Any, parameters: dict) -> dict:
        values = inputs if isinstance(inputs, list) else [inputs]
        if not values:
            raise BadRequest("No image given.")
        self.limits.check("max_images", len(values), "The number of images")
        pixel_values = self.pixel_values([self.read_image(value) for value in values], parameters)
        embeddings, expert_index = self.image_encoder(pixel_values)
        experts = [self.model.config.expert_names[index] for index in expert_index.tolist()]
        return {"embeddings": F.normalize(embeddings, dim=-1).tolist(), "experts": experts, "backend": self.backend}

    @torch.no_grad()
    def text_embeddings(self, inputs: Any) -> dict:
        texts = [inputs] if isinstance(inputs, str) else inputs
        if (
            not isinstance(texts, list)
            or not texts
            or not all(isinstance(text, str) and text.strip() for text in texts)
        ):
            raise BadRequest('Text embeddings need "inputs" as a non-empty string or a list of them.')
        self.limits.check("max_texts", len(texts), "The number of texts")
        self.limits.check("max_text_characters", max(map(len, texts)), "The longest text's length in characters")
        batch = self.processor(text=texts, padding=True, truncation=True)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return {"embeddings": out.text_embeds.tolist()}
