"""The zero-shot-image-classification pipeline of a saved MedMoE folder.

`MedMoEConfig` names this class in `config.custom_pipelines`, so
`pipeline("zero-shot-image-classification", model=FOLDER_OR_HUB_ID, trust_remote_code=True)` builds it. Unlike
transformers' generic pipeline it:
- reads every input the MedMoE image processor reads, DICOM included (a file path, the file's bytes or a pydicom
  Dataset), with `window=` (a CT preset or (centre, width)) and `frame=` per call; URLs are fetched as usual;
- scores with the model's own zero-shot methods (`zero_shot.py`): without `hypothesis_template`, each label
  through every default prompt template, averaged, exactly as the evaluation scores it.
"""

from __future__ import annotations

from transformers.image_utils import load_image
from transformers.pipelines import ZeroShotImageClassificationPipeline

from .zero_shot import DEFAULT_PROMPT_TEMPLATES, class_prompts


class MedMoEZeroShotImageClassificationPipeline(ZeroShotImageClassificationPipeline):
    def _sanitize_parameters(self, tokenizer_kwargs=None, window=None, frame=None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        preprocess_params.update({"window": window, "frame": frame})
        return preprocess_params, forward_params, postprocess_params

    def preprocess(
        self, image, candidate_labels=None, hypothesis_template=None, timeout=None, window=None, frame=None
    ) -> dict:
        if isinstance(image, str) and image.startswith(("http://", "https://")):
            image = load_image(image, timeout=timeout)
        templates = list(DEFAULT_PROMPT_TEMPLATES) if hypothesis_template is None else [hypothesis_template]
        class_prompts(candidate_labels or [], templates)  # checks the labels and the templates before any work
        pixel_values = self.image_processor(images=[image], window=window, frame=frame)["pixel_values"]
        return {
            "pixel_values": pixel_values.to(self.model.dtype),
            "candidate_labels": list(candidate_labels),
            "templates": templates,
        }

    def _forward(self, model_inputs: dict) -> dict:
        image_embeds = self.model.get_image_features(pixel_values=model_inputs["pixel_values"]).pooler_output
        labels, templates = model_inputs["candidate_labels"], model_inputs["templates"]
        class_embeds = self.model.get_zero_shot_class_embeddings(self.tokenizer, labels, templates)
        probabilities = self.model.zero_shot_probabilities(image_embeds, class_embeds)[0]
        return {"candidate_labels": labels, "probabilities": probabilities}

    def postprocess(self, model_outputs: dict) -> list[dict]:
        scores = model_outputs["probabilities"].tolist()
        ranked = sorted(zip(scores, model_outputs["candidate_labels"]), key=lambda pair: -pair[0])
        return [{"score": score, "label": label} for score, label in ranked]
