"""A saved folder is a complete remote-code model: a fresh offline process loads it with the Auto classes."""

import torch
from PIL import Image

from modeling_medmoe import MedMoEConfig

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
