"""MedMoE: a medical vision-language model with a mixture of modality experts (arXiv 2506.08356)."""

from .configuration_medmoe import PRESETS, MedMoEConfig, MedMoEVisionConfig
from .image_processing_medmoe import MedMoEImageProcessor
from .modeling_medmoe import MedMoEForImageClassification, MedMoEModel, MedMoEOutput, MedMoEPreTrainedModel
from .processing_medmoe import MedMoEProcessor
from .report_types import UNKNOWN_REPORT_TYPE, detect_modality, report_type_index
from .zero_shot import DEFAULT_PROMPT_TEMPLATES, zero_shot_class_embeddings, zero_shot_probabilities

__all__ = [
    "DEFAULT_PROMPT_TEMPLATES",
    "PRESETS",
    "UNKNOWN_REPORT_TYPE",
    "MedMoEConfig",
    "MedMoEForImageClassification",
    "MedMoEImageProcessor",
    "MedMoEModel",
    "MedMoEOutput",
    "MedMoEPreTrainedModel",
    "MedMoEProcessor",
    "MedMoEVisionConfig",
    "detect_modality",
    "report_type_index",
    "zero_shot_class_embeddings",
    "zero_shot_probabilities",
]
