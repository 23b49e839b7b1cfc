"""Train and evaluate an open_clip model as MedMoE's baseline: same rows, tokens, image size, batch and budget.

Run by benchmarks/realmed.py inside the separate open_clip virtual environment it creates; by hand:

    .venv-open_clip/bin/python -m benchmarks.open_clip_baseline --dataset_name ../shared/datasets/realmed \
        --tokenizer outputs/benchmark-realmed/medmoe/tokenizer --max_steps 300 --max_train_minutes 20 \
        --output_dir outputs/benchmark-realmed/open_clip

The model is open_clip's `CLIP` built from a config with random initialisation (no download): a ViT image tower
(patch 16) and a causal text transformer pooled at the [SEP] token, sized to MedMoE's `small` preset. Batches come
from training/data.py with a MedMoE processor (the MedMoE run's tokenizer, padded to --max_length), the loss is
open_clip's `ClipLoss`; the optimizer, schedule and optimisation step (clipping, non-finite guard) are the training
scripts' own (training/loop.py). Evaluation is training/run_evaluation.py's `evaluate_model` on a wrapper with
MedMoE's interface, once per --score_splits split. Writes OUT/train_log.jsonl, OUT/run_summary.json,
OUT/model.safetensors + OUT/open_clip_config.json, and per scored split OUT/scored_on_SPLIT/results.json and
OUT/scored_on_SPLIT/anchor_prompts/results.json (zero-shot with the peer anchor's neutral prompts).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from types import SimpleNamespace

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from safetensors.torch import save_file
from transformers import AutoTokenizer, HfArgumentParser, get_scheduler

from medmoe.training import data as data_module
from medmoe.training import run_evaluation as evaluation_module
from medmoe.training.accelerator import accelerator_for_this_machine
from medmoe.training.checkpoints import TrainingProgress
from medmoe.training.data import DataArguments
from medmoe.training.evaluation_embeddings import model_inputs
from medmoe.training.loop import LoopSchedule, build_optimizer, run_training
from modeling_medmoe import MedMoEImageProcessor, MedMoEProcessor

EVAL_TASKS = "zero_shot,retrieval,linear_probe"
CONFIGS = Path(__file__).resolve().parent / "configs"
ANCHOR_PROMPTS = [  # zero-shot also with the peer anchor's neutral prompts (OUT/scored_on_SPLIT/anchor_prompts)
    "--templates", str(CONFIGS / "anchor_prompt_templates.txt"),
    "--class_phrases", str(CONFIGS / "anchor_class_phrases.json"),
]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = HfArgumentParser(DataArguments, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(max_length=48)
    parser.add_argument("--tokenizer", required=True, type=Path, help="the MedMoE run's tokenizer folder")
    parser.add_argument("--output_dir", required=True, type=Path)
    model = parser.add_argument_group("model (defaults: about the parameter count of MedMoE's small preset)")
    model.add_argument("--image_size", type=int, default=128)
    model.add_argument("--patch_size", type=int, default=16)
    model.add_argument("--vision_width", type=int, default=160)
    model.add_argument("--vision_layers", type=int, default=6)
    model.add_argument("--text_width", type=int, default=128)
    model.add_argument("--text_layers", type=int, default=3)
    model.add_argument("--embed_dim", type=int, default=128)
    train = parser.add_argument_group("training (same meaning as in training/pretrain.py)")
    train.add_argument("--max_steps", type=int, default=400)
    train.add_argument("--max_train_minutes", type=float, help="also stop after this much training time")
    train.add_argument("--per_device_train_batch_size", type=int, default=32)
    train.add_argument("--sentence_sampling", type=float, default=0.0, help="share of reports cut to one sentence")
    train.add_argument("--learning_rate", type=float, default=1e-3)
    train.add_argument("--weight_decay", type=float, default=0.05)
    train.add_argument("--warmup_steps", type=int, default=25)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--logging_steps", type=int, default=10)
    train.add_argument("--seed", type=int, default=42)
    parser.add_argument("--skip_evaluation", action="store_true", help="train only (used to measure throughput)")
    parser.add_argument("--score_splits", default="eval", help="comma-separated splits of the data to score on")
    parser.add_argument("--max_train_samples", type=int, default=4000, help="rows the linear probe is fitted on")
    parser.add_argument("--probe_columns", default="modality,label")
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace, tokenizer) -> open_clip.CLIP:
    """open_clip's CLIP from a config, randomly initialised; the text tower reads MedMoE's WordPiece tokens."""
    vision = {
        "image_size": args.image_size,
        "patch_size": args.patch_size,
        "width": args.vision_width,
        "layers": args.vision_layers,
        "head_width": 32,
    }
    text = {
        "context_length": args.max_length,
        "vocab_size": len(tokenizer),
        "width": args.text_width,
        "heads": max(1, args.text_width // 64),
        "layers": args.text_layers,
        "pad_id": tokenizer.pad_token_id,
        "eos_id": tokenizer.sep_token_id,  # causal mask: the [SEP] token has read the whole report
        "pool_type": "eos",
    }
    return open_clip.CLIP(embed_dim=args.embed_dim, vision_cfg=vision, text_cfg=text)


def score_on_splits(model, processor, common_argv: list[str], output_dir: Path, splits: list[str]) -> dict:
    """Score a wrapped open_clip model (OpenClipForEvaluation) with training/run_evaluation.py on each split:
    OUT/scored_on_SPLIT with the project's prompts, OUT/scored_on_SPLIT/anchor_prompts zero-shot with the anchor's.
    `common_argv`: the evaluation flags every score shares (model name, data, probe).
    Returns {split: the result with the project's prompts}."""
    results = {}
    for split in splits:
        folder = output_dir / f"scored_on_{split}"
        argv = [*common_argv, "--device", "cpu", "--eval_split", split]
        scored = evaluation_module.parse_args([*argv, "--output_dir", str(folder), "--tasks", EVAL_TASKS])
        results[split] = evaluation_module.evaluate_model(scored, model, processor, expert_names=[])
        anchor_argv = [*argv, *ANCHOR_PROMPTS, "--output_dir", str(folder / "anchor_prompts"), "--tasks", "zero_shot"]
        evaluation_module.evaluate_model(evaluation_module.parse_args(anchor_argv), model, processor, expert_names=[])
    return results


def fixed_length(input_ids: torch.Tensor, length: int, pad_id: int) -> torch.Tensor:
    """[B, L] -> [B, length]: open_clip adds a positional embedding of exactly context_length."""
    return F.pad(input_ids, (0, length - input_ids.shape[1]), value=pad_id)


class OpenClipForEvaluation(torch.nn.Module):
    """An open_clip model behind the interface training/run_evaluation.py scores (see `EvaluationRun`); one 'expert'."""

    def __init__(self, model: open_clip.CLIP, context_length: int, pad_id: int):
        super().__init__()
        self.model, self.context_length, self.pad_id = model, context_length, pad_id

    def get_text_features(self, input_ids, attention_mask=None):
        ids = fixed_length(input_ids, self.context_length, self.pad_id)
        return SimpleNamespace(pooler_output=self.model.encode_text(ids))

    def clamped_logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().clamp(max=100.0)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, **_):
        """Images and/or reports, as MedMoEModel: image_embeds and expert_index, text_embeds."""
        out = SimpleNamespace(image_embeds=None, text_embeds=None, expert_index=None)
        if pixel_values is not None:
            out.image_embeds = self.model.encode_image(pixel_values, normalize=True)
            out.expert_index = torch.zeros(len(pixel_values), dtype=torch.long)
        if input_ids is not None:
            out.text_embeds = F.normalize(self.get_text_features(input_ids).pooler_output, dim=-1)
        return out


def train(args, model, processor, tokenizer) -> dict:
    options = DataArguments.from_args(args)
    stream, image_column, text_column = data_module.open_stream(options, "train")
    loader = data_module.build_loader(
        stream,
        processor,
        image_column=image_column,
        text_column=text_column,
        batch_size=args.per_device_train_batch_size,
        training=True,
        max_length=args.max_length,
        num_workers=args.num_workers,
        shuffle_seed=args.seed,
        shuffle_buffer=args.shuffle_buffer,
        sentence_sampling=args.sentence_sampling,
    )
    accelerator = accelerator_for_this_machine()
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
    scheduler = get_scheduler("cosine", optimizer, args.warmup_steps, args.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    loss_function = ClipLoss()

    def forward(clip, batch: dict) -> SimpleNamespace:
        """open_clip's CLIP loss on a batch of MedMoE's loader (its tokens padded to the context length)."""
        inputs = model_inputs(batch, accelerator.device)
        text = fixed_length(inputs["input_ids"], args.max_length, tokenizer.pad_token_id)
        image_features, text_features, logit_scale = clip(inputs["pixel_values"], text)
        return SimpleNamespace(loss=loss_function(image_features, text_features, logit_scale))

    log_path = args.output_dir / "train_log.jsonl"
    log_path.unlink(missing_ok=True)

    def clamp_temperature(step, out, bar):
        with torch.no_grad():  # open_clip's training clamps the temperature at 100
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{out.loss.item():.3f}")

    def log(step, out, meter, bar):
        record = {"step": step, "loss": out.loss.item(), "images_per_s": meter.images_per_second()}
        with log_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    progress = TrainingProgress()
    train_seconds = run_training(
        accelerator,
        model,
        optimizer,
        scheduler,
        loader,
        forward,
        LoopSchedule(args.max_steps, args.max_train_minutes, args.logging_steps),
        progress,
        max_grad_norm=args.max_grad_norm,
        description="open_clip pretraining",
        after_step=clamp_temperature,
        log=log,
    )
    return {
        "steps": progress.step,
        "images_seen": progress.images_seen,
        "train_seconds": round(train_seconds, 1),
        "skipped_steps": progress.skipped_steps,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    processor = MedMoEProcessor(
        image_processor=MedMoEImageProcessor(size={"height": args.image_size, "width": args.image_size}),
        tokenizer=tokenizer,
    )
    model = build_model(args, tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"open_clip CLIP: {parameters / 1e6:.2f}M parameters, random init; data: {args.dataset_name}")
    summary = {"system": "open_clip", "open_clip_version": open_clip.__version__, "parameters": parameters}
    summary.update(train(args, model, processor, tokenizer))
    save_file(model.state_dict(), str(args.output_dir / "model.safetensors"))
    (args.output_dir / "open_clip_config.json").write_text(json.dumps(vars(args), default=str, indent=2) + "\n")
    if not args.skip_evaluation:
        common_argv = [
            "--model", "open_clip", "--probe_columns", args.probe_columns,
            "--max_train_samples", str(args.max_train_samples), "--dataset_name", args.dataset_name,
        ]  # fmt: skip
        for flag in ("train_files", "eval_files"):
            if getattr(args, flag):
                common_argv += [f"--{flag}", getattr(args, flag)]
        wrapper = OpenClipForEvaluation(model, args.max_length, tokenizer.pad_token_id)
        splits = [split.strip() for split in args.score_splits.split(",") if split.strip()]
        summary["evaluation"] = score_on_splits(wrapper, processor, common_argv, args.output_dir, splits)
    (args.output_dir / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"open_clip run: {args.output_dir} (run_summary.json, model.safetensors, scored_on_SPLIT/results.json)")
    return summary


if __name__ == "__main__":
    main()
