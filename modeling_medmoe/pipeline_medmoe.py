# Copyright 2026 The MedMoE Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file except in compliance with
# the License. You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software distributed under the License is distributed on
# an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the
# specific language governing permissions and limitations under the License.
"""The zero-shot-image-classification pipeline of a saved MedMoE folder.

`MedMoEConfig` names this class in `config.custom_pipelines`, so
`pipeline("zero-shot-image-classification", model=FOLDER_OR_HUB_ID, trust_remote_code=True)` builds it. Unlike
transformers' generic pipeline it:
- reads every input the MedMoE image processor reads, DICOM included (a file path, the file's bytes or a pydicom
  Dataset), with `window=` (a CT preset or (centre, width)) and `frame=` per call; a URL is fetched within the
  image processor's limits (`timeout=` seconds, default `url_timeout_seconds`, for the whole download, and at most
  `max_image_bytes`);
- runs the image side on the folder's ONNX export (`training/export.py`) when it holds one and onnxruntime is
  installed;
- takes `candidate_labels` as a list or one comma-separated string, and checks labels and template against the
  limits (`limits.py`) before any work;
- scores with the model's own zero-shot methods (`zero_shot.py`): without `hypothesis_template`, each label
  through every default prompt template, averaged, exactly as the evaluation scores it.
"""

from __future__ import annotations

import http.client
import time
import urllib.request

import torch
from transformers.pipelines import ZeroShotImageClassificationPipeline

from .image_encoder import ImageEncoder
from .limits import InputLimits
from .zero_shot import zero_shot_request

DOWNLOAD_CHUNK_BYTES = 1 << 16


def fetch_url(url: str, limits: InputLimits, timeout: float | None = None) -> bytes:
    """The body of `url`, within `timeout` seconds in all (default: the limits' url_timeout_seconds) and at most
    max_image_bytes; ValueError says what went wrong."""
    timeout = limits.url_timeout_seconds if timeout is None else timeout
    deadline = time.monotonic() + timeout
    body = bytearray()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # the timeout bounds connect and each read
            while chunk := response.read(DOWNLOAD_CHUNK_BYTES):
                body += chunk
                limits.check("max_image_bytes", len(body), f"The download of {url} in bytes")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the download took longer than {timeout} s")
    except (OSError, http.client.HTTPException) as error:  # URLError, TimeoutError, socket errors are OSErrors
        raise ValueError(f"Cannot fetch {url}: {type(error).__name__}: {error or 'no answer'}") from error
    return bytes(body)


class MedMoEZeroShotImageClassificationPipeline(ZeroShotImageClassificationPipeline):
    def _sanitize_parameters(self, tokenizer_kwargs=None, window=None, frame=None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        preprocess_params.update({"window": window, "frame": frame})
        return preprocess_params, forward_params, postprocess_params

    def preprocess(
        self, image, candidate_labels=None, hypothesis_template=None, timeout=None, window=None, frame=None
    ) -> dict:
        limits = self.image_processor.limits
        labels, templates = zero_shot_request(candidate_labels, hypothesis_template, limits)  # before any work
        if isinstance(image, str) and image.startswith(("http://", "https://")):
            image = fetch_url(image, limits, timeout)
        pixel_values = self.image_processor(images=[image], window=window, frame=frame)["pixel_values"]
        return {"pixel_values": pixel_values.to(self.model.dtype), "candidate_labels": labels, "templates": templates}

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, P]: on the folder's ONNX export when it has one and onnxruntime is installed, else in PyTorch."""
        if not hasattr(self, "image_encoder"):
            self.image_encoder = ImageEncoder.for_model(self.model)
        return self.image_encoder(pixel_values)[0]

    def _forward(self, model_inputs: dict) -> dict:
        image_embeds = self.image_embeddings(model_inputs["pixel_values"])
        labels, templates = model_inputs["candidate_labels"], model_inputs["templates"]
        class_embeds = self.model.get_zero_shot_class_embeddings(self.tokenizer, labels, templates)
        probabilities = self.model.zero_shot_probabilities(image_embeds, class_embeds)[0]
        return {"candidate_labels": labels, "probabilities": probabilities}

    def postprocess(self, model_outputs: dict) -> list[dict]:
        scores = model_outputs["probabilities"].tolist()
        ranked = sorted(zip(scores, model_outputs["candidate_labels"]), key=lambda pair: -pair[0])
        return [{"score": score, "label": label} for score, label in ranked]
