"""transformers' own common tests, unchanged, on MedMoEModel, MedMoEForImageClassification, their configs and
MedMoEProcessor, with the flags CLIP's tests use; each skip says why the test does not apply to a dual encoder.

The common test files ship in the sdist of the installed transformers version (tests/transformers_common says how
they are fetched); without them this module is skipped with the command that fetches them.
"""

import tempfile
import unittest
from pathlib import Path

import pytest
import torch

from tests import transformers_common

if transformers_common.missing_reason():
    pytest.skip(transformers_common.missing_reason(), allow_module_level=True)
transformers_common.assemble(Path(tempfile.mkdtemp(prefix="transformers-common-")))

from transformers_common_tests.test_configuration_common import ConfigTester  # noqa: E402
from transformers_common_tests.test_modeling_common import (  # noqa: E402
    ModelTesterMixin,
    floats_tensor,
    ids_tensor,
    random_attention_mask,
)
from transformers_common_tests.test_processing_common import ProcessorTesterMixin  # noqa: E402

from medmoe.training.tokenizer import train_wordpiece_tokenizer  # noqa: E402
from modeling_medmoe import (  # noqa: E402
    MedMoEConfig,
    MedMoEForImageClassification,
    MedMoEImageProcessor,
    MedMoEModel,
    MedMoEProcessor,
    MedMoEVisionConfig,
)

from .conftest import REPORTS  # noqa: E402


class TextTester:
    """The text tower's sizes and inputs (a 2-layer BERT)."""

    def __init__(self, batch_size=4, seq_length=7, vocab_size=99, hidden_size=16, num_hidden_layers=2):
        self.batch_size, self.seq_length, self.vocab_size = batch_size, seq_length, vocab_size
        self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers

    def get_config(self) -> dict:
        return {"model_type": "bert", "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": 2, "intermediate_size": 32,
                "max_position_embeddings": 32}  # fmt: skip

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return None, {"input_ids": input_ids, "attention_mask": attention_mask}


class VisionTester:
    """The image side's sizes and inputs: a 4-level Swin pyramid, whose levels and the chosen expert's fused map are
    the image side's hidden states (num_hidden_layers + 1 = 5)."""

    def __init__(self, batch_size=4, image_size=32, expert_dim=16):
        self.batch_size, self.image_size, self.expert_dim = batch_size, image_size, expert_dim
        self.num_hidden_layers = 4

    def get_config(self) -> dict:
        return {"backbone_kwargs": {"embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2],
                                    "window_size": 2}, "image_size": self.image_size,
                "expert_dim": self.expert_dim}  # fmt: skip

    def prepare_config_and_inputs_for_common(self):
        pixel_values = floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
        return None, {"pixel_values": pixel_values}


class MedMoEModelTester:
    """Inputs force the experts alternately (`expert_index`), so that every expert runs in every test: a common test
    that follows one layer (the checkpointing test follows the first expert) always sees it run."""

    def __init__(self, parent, batch_size=4, is_training=True):
        self.parent, self.batch_size, self.is_training = parent, batch_size, is_training
        self.text_model_tester = TextTester(batch_size)
        self.vision_model_tester = VisionTester(batch_size)

    def get_config(self) -> MedMoEConfig:
        return MedMoEConfig(text_config=self.text_model_tester.get_config(),
                            vision_config=self.vision_model_tester.get_config(), projection_dim=16, num_experts=2,
                            text_hidden_layers_to_sum=2, local_loss_chunk_size=2)  # fmt: skip

    def prepare_config_and_inputs_for_common(self):
        _, text = self.text_model_tester.prepare_config_and_inputs_for_common()
        _, image = self.vision_model_tester.prepare_config_and_inputs_for_common()
        word_ids = torch.arange(text["input_ids"].shape[1]).expand_as(text["input_ids"]).masked_fill(
            text["attention_mask"] == 0, -1
        )  # fmt: skip
        alternating = torch.tensor([0, 1] * (self.batch_size // 2))
        inputs = {**text, **image, "word_ids": word_ids, "report_type_labels": alternating,
                  "expert_index": alternating, "return_loss": True}  # fmt: skip
        return self.get_config(), inputs


class MedMoEModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (MedMoEModel,)
    additional_model_inputs = ["pixel_values"]
    test_attention_outputs = False
    _is_composite = True

    def setUp(self):
        self.model_tester = MedMoEModelTester(self)
        self.config_tester = ConfigTester(self, config_class=MedMoEConfig, has_text_modality=False,
                                          common_properties=["projection_dim", "logit_scale_init_value"])  # fmt: skip

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="Hidden_states is tested in individual model tests")
    def test_hidden_states_output(self):
        pass

    @unittest.skip(reason="Inputs_embeds is tested in individual model tests")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="Retain_grad is tested in individual model tests")
    def test_retain_grad_hidden_states_attentions(self):
        pass

    @unittest.skip(
        reason="The image side has no attention weights: timm's Swin computes them fused and does not return them "
        "(the experts' attention over pyramid levels is MedMoEOutput.scale_attention)"
    )
    def test_get_image_features_attentions(self):
        pass


class MedMoEForImageClassificationTester(MedMoEModelTester):
    """The image side alone: pixel values and class labels in (the class is not in transformers' image
    classification mapping, so the tester gives the labels), logits and loss out."""

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        _, image = self.vision_model_tester.prepare_config_and_inputs_for_common()
        labels = ids_tensor([self.batch_size], config.num_labels)
        return config, {**image, "labels": labels, "expert_index": torch.tensor([0, 1] * (self.batch_size // 2))}


class MedMoEForImageClassificationTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (MedMoEForImageClassification,)
    has_attentions = False  # timm's Swin computes its attention fused and does not return the weights
    test_resize_embeddings = False
    test_attention_outputs = False
    _is_composite = True

    def setUp(self):
        self.model_tester = MedMoEForImageClassificationTester(self)

    @unittest.skip(reason="MedMoEForImageClassification does not support inputs_embeds")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="MedMoEForImageClassification does not support inputs_embeds")
    def test_model_get_set_embeddings(self):
        pass

    @unittest.skip(
        reason="The image side's hidden states are the 4 pyramid levels and the fused map, maps of different sizes "
        "[B, C_l, H_l, W_l], not one sequence of hidden states (MedMoEModel's get_image_features tests count them)"
    )
    def test_hidden_states_output(self):
        pass


class MedMoEVisionConfigTest(unittest.TestCase):
    def test_config(self):
        ConfigTester(self, config_class=MedMoEVisionConfig, has_text_modality=False,
                     common_properties=["expert_dim", "image_size"]).run_common_tests()  # fmt: skip


class MedMoEProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = MedMoEProcessor

    @classmethod
    def _setup_image_processor(cls):
        return MedMoEImageProcessor(size={"height": 32, "width": 32})

    @classmethod
    def _setup_tokenizer(cls):
        return train_wordpiece_tokenizer(REPORTS * 4, vocab_size=300)
