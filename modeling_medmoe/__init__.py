# Copyright 2026 The MedMoE Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file except in compliance with
# the License. You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software distributed under the License is distributed on
# an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the
# specific language governing permissions and limitations under the License.
"""MedMoE: a medical vision-language model with a mixture of modality experts (arXiv 2506.08356)."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .configuration_medmoe import PRESETS, UNKNOWN_REPORT_TYPE, MedMoEConfig, MedMoEVisionConfig
from .image_encoder import ImageEncoder
from .image_processing_medmoe import MedMoEImageProcessor
from .modeling_medmoe import MedMoEForImageClassification, MedMoEModel, MedMoEOutput, MedMoEPreTrainedModel
from .processing_medmoe import MedMoEProcessor
from .zero_shot import DEFAULT_PROMPT_TEMPLATES, zero_shot_class_embeddings, zero_shot_probabilities

# With this package installed, the Auto classes know MedMoE's classes, as transformers' own models (a saved folder
# loads without trust_remote_code, and MedMoEProcessor.from_pretrained finds its image processor here). A folder's
# own copy of the code, loaded with trust_remote_code=True, does not import this file and registers nothing.
AutoConfig.register(MedMoEConfig.model_type, MedMoEConfig, exist_ok=True)
AutoImageProcessor.register(MedMoEConfig, MedMoEImageProcessor, exist_ok=True)
AutoProcessor.register(MedMoEConfig, MedMoEProcessor, exist_ok=True)
AutoModel.register(MedMoEConfig, MedMoEModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(MedMoEConfig, MedMoEModel, exist_ok=True)
AutoModelForImageClassification.register(MedMoEConfig, MedMoEForImageClassification, exist_ok=True)

__all__ = [
    "DEFAULT_PROMPT_TEMPLATES",
    "PRESETS",
    "ImageEncoder",
    "UNKNOWN_REPORT_TYPE",
    "MedMoEConfig",
    "MedMoEForImageClassification",
    "MedMoEImageProcessor",
    "MedMoEModel",
    "MedMoEOutput",
    "MedMoEPreTrainedModel",
    "MedMoEProcessor",
    "MedMoEVisionConfig",
    "zero_shot_class_embeddings",
    "zero_shot_probabilities",
]
