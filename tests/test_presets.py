"""Presets: the paper's Table 3 from config alone, and a CPU-sized nano model."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from modeling_medmoe import MedMoEConfig, MedMoEModel


def vision_parameters(model: MedMoEModel) -> int:
    return sum(
        p.numel()
        for module in (model.vision_model.vision_pyramid, model.vision_model.image_router, model.vision_model.experts)
        for p in module.parameters()
    )


def test_swin_tiny_preset_reproduces_table_3():
    """37M vision parameters counting all experts (+-8%), 7.8 GMACs at 224 px with one expert active (+-15%)."""
    config = MedMoEConfig.from_preset("swin-tiny")
    assert config.num_experts == 6 and config.vision_config.expert_dim == 768
    assert config.text_config.hidden_size == 768 and config.text_config.num_hidden_layers == 12
    model = MedMoEModel(config).eval()
    assert vision_parameters(model) == pytest.approx(37e6, rel=0.08)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.get_image_features(pixel_values=torch.randn(1, 3, 224, 224))
    multiply_accumulates = counter.get_total_flops() / 2
    assert multiply_accumulates == pytest.approx(7.8e9, rel=0.15)


def test_nano_preset_is_cpu_sized(nano_config, batch):
    """A few million parameters at <= 96 px (its speed is measured in benchmarks/, not asserted here)."""
    model = MedMoEModel(nano_config)
    assert sum(p.numel() for p in model.parameters()) < 5e6
    assert nano_config.vision_config.image_size <= 96
    labels = torch.tensor([0, 1, 2, 3, 4, 5, -100, -100])
    model(**batch, return_loss=True, report_type_labels=labels).loss.backward()


@pytest.mark.parametrize("name", ["nano", "small", "swin-tiny"])
def test_presets_round_trip_through_json(name, tmp_path):
    config = MedMoEConfig.from_preset(name)
    config.save_pretrained(tmp_path)
    assert MedMoEConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="nano"):
        MedMoEConfig.from_preset("swin-huge")
