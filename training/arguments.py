"""The argument model of the training scripts, as transformers' example scripts have it: dataclasses parsed with
HfArgumentParser, one field (one flag, one default, its help) per setting.

- `PretrainingArguments`: what pretrain.py builds (preset, towers, experts, tokenizer).
- `FinetuningArguments`: what finetune.py starts from and trains (the model, the task, LoRA).
- `data.DataArguments`: where the rows come from and how they are read (every script, evaluation included).
- `RunArguments`: how a training run goes (output folder, steps, optimiser, precision, checkpoints, resume, logging,
  trackers, the Hub): shared by both training scripts, with the defaults of `FINETUNING_DEFAULTS` for fine-tuning.

`parse(argument_classes, argv, doc)` gives one flat namespace of all of them (the scripts read `args.seed`,
`args.dataset_name`, ...); each class checks its own fields (`__post_init__`), a bad combination is a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import HfArgumentParser

from medmoe.training.data import help_field


@dataclass
class RunArguments:
    """How a training run goes; shared by pretraining and fine-tuning."""

    output_dir: Path | None = help_field(None, "the folder this run writes (the model or adapter, with the run)")
    overwrite_output_dir: bool = help_field(False, "delete an earlier run in --output_dir and start over")
    max_steps: int = help_field(400, "optimizer steps (the schedule's length)")
    max_train_minutes: float | None = help_field(None, "also stop after this much training time (a clock budget)")
    per_device_train_batch_size: int = help_field(32, "rows per training batch and process")
    gradient_accumulation_steps: int = help_field(1, "batches per optimizer step")
    learning_rate: float = help_field(2e-3, "AdamW's peak learning rate")
    weight_decay: float = help_field(0.05, "AdamW's weight decay (not on biases and norms)")
    lr_scheduler_type: str = help_field("cosine", "transformers' scheduler name (cosine, linear, constant, ...)")
    warmup_steps: int = help_field(50, "steps of linear warm-up")
    max_grad_norm: float = help_field(1.0, "gradient clipping (0 = none)")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = help_field(None, "default: accelerate's config")
    seed: int = help_field(42, "seed of the initialisation, the shuffle and dropout")
    sentence_sampling: float = help_field(
        0.0, "share of training reports replaced by one of their sentences, drawn at random (ConVIRT; 0 = off)"
    )
    gradient_checkpointing: bool = help_field(False, "recompute activations in the backward pass (less memory)")
    logging_steps: int = help_field(10, "log the loss every N steps")
    eval_steps: int = help_field(100, "evaluate every N steps (0 = only at the end)")
    checkpointing_steps: int = help_field(0, "checkpoint every N steps (0 = never)")
    checkpoints_total_limit: int = help_field(2, "keep this many checkpoints (0 = all)")
    resume_from_checkpoint: str | None = help_field(None, "latest or a checkpoint folder")
    report_to: str = help_field("tensorboard", "accelerate trackers: tensorboard, wandb, all or none")
    log_level: Literal["debug", "info", "warning", "error"] = help_field(
        "info", "the main process's log level (the others log warnings and errors); the log is also OUTPUT_DIR/run.log"
    )
    push_to_hub: bool = help_field(False, "upload the result folder (login or HF_TOKEN)")
    hub_model_id: str | None = help_field(None, "ORG/NAME of the Hub repo")
    hub_private: bool = help_field(False, "create the Hub repo private")

    def __post_init__(self):
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id ORG/NAME")


FINETUNING_DEFAULTS = {  # a pretrained model moves less and for fewer steps than one trained from scratch
    "max_steps": 200,
    "per_device_train_batch_size": 16,
    "learning_rate": 5e-4,
    "weight_decay": 0.01,
    "warmup_steps": 10,
    "eval_steps": 0,
    "max_eval_samples": 1000,
}


@dataclass
class PretrainingArguments:
    """The model pretraining builds: a preset, its towers, its experts, its tokenizer."""

    preset: str = help_field("nano", "nano | small | swin-tiny (see MedMoEConfig.from_preset)")
    text_model: str | None = help_field(None, "start the text tower and tokenizer from this BERT-style model")
    vision_backbone_pretrained: bool = help_field(False, "load timm's pretrained backbone weights (Hub)")
    vision_backbone_weights: Path | None = help_field(
        None, "start the backbone from this local timm checkpoint (.safetensors of the whole timm model; offline)"
    )
    router_input: Literal["image", "text", "text_teacher"] | None = help_field(None, "override the preset's router")
    num_experts: int | None = help_field(None, "number of experts (1 = no mixture)")
    expert_names: str | None = help_field(
        None,
        "one expert per report type, comma-separated, e.g. the modalities of your data (default: X-ray,CT,MRI,"
        "ultrasound,pathology,fundus); report-type labels index this list",
    )
    local_loss_weight: float | None = help_field(None, "weight of the local loss (0 = global loss only)")
    router_loss_weight: float | None = help_field(None, "weight of the router's cross-entropy")
    expert_depth: int | None = help_field(None, "1 = 1x1 projections (paper Table 3); >1 adds conv blocks")
    config_overrides: str | None = help_field(
        None,
        'override config attributes, sub-configs by dotted name: "vision_config.router_levels=all,'
        'text_config.num_hidden_layers=4" (applied last)',
    )
    tokenizer: str | None = help_field(None, "use this tokenizer (folder or Hub id) instead of learning one")
    tokenizer_vocab_size: int = help_field(2048, "WordPiece vocabulary learnt from the data")
    tokenizer_training_rows: int = help_field(2000, "rows whose reports train the tokenizer")
    ground_truth_columns: str = help_field(
        "modality,finding_box,label", "columns kept for evaluation when present (comma-separated)"
    )
    torch_compile: bool = help_field(False, "torch.compile the backbone and the text tower")
    profile_steps: int = help_field(
        0, "profile this many steps after the warm-up: a per-component table in OUTPUT_DIR/profile.md (0 = off)"
    )

    def __post_init__(self):
        if self.vision_backbone_weights and Path(self.vision_backbone_weights).suffix != ".safetensors":
            raise ValueError("--vision_backbone_weights takes a .safetensors file (nothing is unpickled)")
        if self.expert_names is None:
            return
        names = [name.strip() for name in self.expert_names.split(",") if name.strip()]
        if not names:
            raise ValueError("--expert_names needs at least one name")
        if self.num_experts not in (None, len(names)):
            raise ValueError(f"--num_experts {self.num_experts} but --expert_names names {len(names)} experts")
        if len({name.lower() for name in names}) < len(names):
            raise ValueError(f"--expert_names names a report type twice: {names}")
        self.expert_names, self.num_experts = names, len(names)


# LoRA's default targets, our own module names: Swin attention (qkv, attn.proj), BERT attention (query, value) and the
# projections.
DEFAULT_LORA_TARGETS = ("qkv", "attn.proj", "query", "value", "image_projection", "text_projection")


@dataclass
class FinetuningArguments:
    """What fine-tuning starts from and trains."""

    model: str = dataclasses.field(metadata={"help": "pretrained MedMoE folder or Hub id"})
    task: Literal["classification", "contrastive"] = help_field("classification", "what the model learns")
    label_column: str = help_field("modality", "the class column (classification)")
    class_scan_rows: int = help_field(5000, "train rows read to find the classes")
    lora: bool = help_field(False, "train LoRA adapters instead of all weights")
    lora_r: int = help_field(8, "LoRA's rank")
    lora_alpha: int = help_field(16, "LoRA's scale")
    lora_dropout: float = help_field(0.05, "dropout on LoRA's input")
    lora_target: str = help_field(",".join(DEFAULT_LORA_TARGETS), "comma-separated module names")
    merge: bool = help_field(False, "also save the LoRA weights merged into the model (OUTPUT_DIR/merged)")


def parse(
    argument_classes: tuple, argv: list[str] | None, doc: str, defaults: dict | None = None
) -> argparse.Namespace:
    """Parse `argv` into the dataclasses (their checks run) and return their fields as one namespace; a failed check
    is a usage error naming the flag. `defaults` replaces fields' defaults (e.g. `FINETUNING_DEFAULTS`)."""
    parser = HfArgumentParser(argument_classes, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(**(defaults or {}))
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:
        parser.error(str(error))
    return argparse.Namespace(**{key: value for part in parsed for key, value in dataclasses.asdict(part).items()})
