"""A saved folder is a complete remote-code model: a fresh offline process loads it with the Auto classes."""

from pathlib import Path

import torch
from PIL import Image

from modeling_medmoe import MedMoEConfig, MedMoEModel

from .conftest import REPORTS
from .helpers import load_in_fresh_process

LABELS = ["chest x-ray", "brain mri", "abdominal ct"]


def test_saved_folder_loads_in_a_fresh_offline_process(model, processor, images, tmp_path):
    folder = tmp_path / "medmoe-nano"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    config = MedMoEConfig.from_pretrained(folder)
    assert config.auto_map["AutoModel"] == "modeling_medmoe.MedMoEModel"
    assert config.auto_map["AutoModelForZeroShotImageClassification"] == "modeling_medmoe.MedMoEModel"

    work = tmp_path / "elsewhere"
    work.mkdir()
    result = load_in_fresh_process(folder, images[:4], REPORTS[:4], LABELS, work)

    # The images went through PNG on disk; load them back the same way here.
    reloaded = [Image.open(work / f"image_{index}.png") for index in range(4)]
    batch = processor(images=reloaded, text=REPORTS[:4], return_tensors="pt", padding=True, truncation=True)
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    assert result["module"].startswith("transformers_modules"), "loaded from the folder's own code"
    torch.testing.assert_close(torch.tensor(result["logits_per_image"]), out.logits_per_image, rtol=0, atol=0)
    assert result["expert_index"] == out.expert_index.tolist()
    scores = result["pipeline"]
    assert sorted(entry["label"] for entry in scores) == sorted(LABELS)
    assert abs(sum(entry["score"] for entry in scores) - 1.0) < 1e-5


def test_a_folder_saved_before_the_vision_module_loads_with_the_same_outputs():
    """tests/fixtures/medmoe-saved-2026-11-30 was saved by the code of that day, whose image side had no
    `vision_model.` prefix; it loads (a conversion on load) and gives the outputs it gave then. New saves keep the
    same weight names on disk, so older code reads them too."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(__file__).parent / "fixtures" / "medmoe-saved-2026-11-30"
    reference = load_file(folder / "reference_outputs.safetensors")
    model = MedMoEModel.from_pretrained(folder).eval()
    inputs = {"pixel_values": reference["pixel_values"], "input_ids": reference["input_ids"]}
    with torch.no_grad():
        out = model(**inputs, attention_mask=torch.ones_like(reference["input_ids"]))
    torch.testing.assert_close(out.image_embeds, reference["image_embeds"])
    torch.testing.assert_close(out.text_embeds, reference["text_embeds"])
    assert out.expert_index.tolist() == reference["expert_index"].tolist()
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        legacy_names = set(handle.keys())
    assert "vision_pyramid.backbone.patch_embed.proj.weight" in legacy_names
    assert not any(name.startswith("vision_model.") for name in legacy_names)
