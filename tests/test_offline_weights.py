"""Air-gapped starts: the vision backbone from a local safetensors file through timm's own local-file mechanism."""

import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from medmoe.training.starting_points import PretrainedWeightsUnavailable, load_pretrained_vision_backbone
from modeling_medmoe import MedMoEModel


def timm_checkpoint(nano_config, path):
    """A whole timm model of the nano backbone's architecture, as a timm Hub repo's model.safetensors holds it."""
    vision = nano_config.vision_config
    torch.manual_seed(7)
    whole = timm.create_model(vision.backbone, img_size=vision.image_size, **vision.backbone_kwargs)
    save_file({name: tensor.contiguous() for name, tensor in whole.state_dict().items()}, path)
    return whole.state_dict()


def test_backbone_starts_from_a_local_safetensors_file(nano_config, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    saved = timm_checkpoint(nano_config, tmp_path / "swin.safetensors")
    model = MedMoEModel(nano_config)
    load_pretrained_vision_backbone(model, tmp_path / "swin.safetensors")
    loaded = (
        model.vision_model.vision_pyramid.backbone.state_dict()
    )  # timm's feature wrapper names "layers.0" "layers_0"
    assert len(loaded) > 20
    for name, tensor in loaded.items():
        torch.testing.assert_close(tensor, saved[re.sub(r"_(\d+)", r".\1", name)], msg=name)


def test_only_existing_safetensors_files_are_read(nano_config, tmp_path):
    model = MedMoEModel(nano_config)
    torch.save({}, tmp_path / "swin.pth")
    with pytest.raises(ValueError, match="takes a .safetensors file"):
        load_pretrained_vision_backbone(model, tmp_path / "swin.pth")
    with pytest.raises(FileNotFoundError, match="No backbone weights file"):
        load_pretrained_vision_backbone(model, tmp_path / "missing.safetensors")
    save_file({"unrelated": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(PretrainedWeightsUnavailable, match="other.safetensors is not a checkpoint of timm's"):
        load_pretrained_vision_backbone(model, tmp_path / "other.safetensors")


def test_a_checkpoint_of_another_size_is_named_as_such(nano_config, tmp_path):
    """A swin-tiny-sized checkpoint given to the nano preset once said to "pass a local folder"."""
    vision = nano_config.vision_config
    wider = timm.create_model(
        vision.backbone, img_size=vision.image_size, **{**vision.backbone_kwargs, "embed_dim": 48}
    )
    save_file({name: tensor.contiguous() for name, tensor in wider.state_dict().items()}, tmp_path / "wide.safetensors")
    with pytest.raises(PretrainedWeightsUnavailable, match="does not fit the configured backbone") as refused:
        load_pretrained_vision_backbone(MedMoEModel(nano_config), tmp_path / "wide.safetensors")
    assert "local folder" not in str(refused.value)
