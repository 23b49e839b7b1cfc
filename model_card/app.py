"""Gradio demo for a Hub Space: zero-shot scores, the chosen expert and the attention overlay of an uploaded image
or DICOM file.

    pip install -e ".[demo]"
    python model_card/app.py --model outputs/medmoe-nano      # or a Hub id

For a Space, copy this file as app.py next to a requirements.txt (torch, transformers, timm, gradio) and set
MEDMOE_MODEL to the model's Hub id.
"""

from __future__ import annotations

import argparse
import importlib
import os

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image
from transformers import AutoModel, AutoProcessor


class Demo:
    """The model behind the demo; `predict` is the whole computation, free of any UI."""

    def __init__(self, model_name: str):
        self.model = AutoModel.from_pretrained(model_name, trust_remote_code=True).eval()
        self.processor = AutoProcessor.from_pretrained(model_name, trust_remote_code=True)
        # the labels' checks and limits of the model folder's own code (a Space has only the folder)
        code_package = type(self.model).__module__.rpartition(".")[0]
        self.zero_shot_request = importlib.import_module(".zero_shot", package=code_package).zero_shot_request

    @torch.no_grad()
    def predict(self, image, labels_text: str, window: str | None = None) -> tuple[dict[str, float], str, Image.Image]:
        """Scores per label (comma-separated, default: the expert names) from the model's zero-shot methods, the
        chosen expert, and the image with the attention of the best label's words over it.

        `image` is anything the model's image processor reads: a PIL image, an image or DICOM file path, DICOM bytes
        or a pydicom Dataset; `window` (a CT preset name or "centre,width") applies to DICOM and 16-bit images.
        """
        image_processor = self.processor.image_processor
        labels, templates = self.zero_shot_request(
            labels_text if labels_text.strip() else list(self.model.config.expert_names), None, image_processor.limits
        )
        shown = image_processor.to_display(image, window=window or None)  # decoded and windowed once
        pixel_values = image_processor.unit_to_model_input(shown)[None]
        image_out = self.model(pixel_values=pixel_values)
        class_embeds = self.model.get_zero_shot_class_embeddings(self.processor.tokenizer, labels, templates)
        scores = self.model.zero_shot_probabilities(image_out.image_embeds, class_embeds)[0]
        best = int(scores.argmax())
        expert = self.model.config.expert_names[int(image_out.expert_index[0])]
        text = self.processor(text=[labels[best]], padding=True, truncation=True)
        paired = self.model(pixel_values=pixel_values, **text)
        word_attention = paired.word_region_attention[0][paired.word_mask[0]].mean(dim=0)  # [h, w]
        return {label: float(score) for label, score in zip(labels, scores)}, expert, overlay(shown, word_attention)


def overlay(image: torch.Tensor, attention: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """The image ([3, H, W] in [0, 1]) with a jet-coloured attention map [h, w] blended over it."""
    base = image.permute(1, 2, 0).numpy()
    resized = F.interpolate(attention[None, None].float(), size=base.shape[:2], mode="bilinear", align_corners=False)
    heat = resized[0, 0].numpy()
    heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-8)
    coloured = colormaps["jet"](heat)[..., :3]
    blended = np.clip((1 - alpha) * base + alpha * coloured, 0, 1)
    return Image.fromarray((blended * 255).astype(np.uint8))


def build_interface(demo: Demo):
    import gradio as gr

    def predict(upload, labels_text, window):
        if upload is None:
            raise gr.Error("Upload an image or a DICOM file.")
        try:  # the file's bytes, as the archive search page sends them: the image processor tells DICOM from images
            with open(upload, "rb") as handle:
                return demo.predict(handle.read(), labels_text, window)
        except (ValueError, ImportError) as error:  # undecodable image or DICOM, bad window, over the limits: say why
            raise gr.Error(str(error)) from None

    return gr.Interface(
        fn=predict,
        inputs=[
            gr.File(label="an image or a DICOM file", type="filepath"),
            gr.Textbox(label="labels (comma-separated)"),
            gr.Textbox(label="DICOM window: lung, mediastinum, bone, brain, abdomen or centre,width (optional)"),
        ],
        outputs=[gr.Label(label="zero-shot scores"), gr.Textbox(label="chosen expert"), gr.Image(label="attention")],
        title="MedMoE",
        description="Research demo, not for clinical use.",
        flagging_mode="never",
        analytics_enabled=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MEDMOE_MODEL"), help="folder or Hub id (or MEDMOE_MODEL)")
    args = parser.parse_args()
    if not args.model:
        parser.error("pass --model or set MEDMOE_MODEL")
    demo = Demo(args.model)
    build_interface(demo).launch(max_file_size=demo.processor.image_processor.limits.max_image_bytes)


if __name__ == "__main__":
    main()
