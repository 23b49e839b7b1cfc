"""Fine-tune a pretrained MedMoE folder: image classification or image-report contrastive, fully or with LoRA.

    accelerate launch training/finetune.py --model outputs/medmoe-nano --task classification \
        --label_column modality --lora --output_dir outputs/finetune-nano
    accelerate launch training/finetune.py --model outputs/medmoe-realmed --task contrastive --lora \
        --dataset_name ../shared/datasets/realmed --output_dir outputs/finetune-realmed

OUTPUT_DIR itself is the result, as in transformers' and peft's example scripts: the adapter (LoRA; load it with
PeftModel.from_pretrained on the base) or the whole model (full fine-tuning), with the processor and
eval_results.json; --merge also writes the merged model to OUTPUT_DIR/merged. The run goes as pretraining's does
(training/run.py, the same training flags): checkpoints in OUTPUT_DIR/checkpoints (--checkpointing_steps), resume
(--resume_from_checkpoint latest), --mixed_precision, trackers (--report_to), the per-step log train_log.jsonl and
the log run.log, the result written in place only once complete, --push_to_hub; an earlier run's folder is never
overwritten silently.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoProcessor

from medmoe.training import data as data_module
from medmoe.training.arguments import FINETUNING_DEFAULTS, FinetuningArguments, RunArguments, parse
from medmoe.training.checkpoints import NoLoadableCheckpoint
from medmoe.training.data import DataArguments
from medmoe.training.evaluation_metrics import dataset_description, evaluate_retrieval_and_routing
from medmoe.training.loop import contrastive_forward
from medmoe.training.metrics import classification_results
from medmoe.training.run import LOG_FILE, STEP_LOG, ModelFolderNotSaved, OutputDirNotEmpty, TrainingRun
from modeling_medmoe import MedMoEForImageClassification, MedMoEModel

logger = logging.getLogger(__name__)

# What a run leaves beside the result in --output_dir; the upload leaves them out.
RUN_FILES = ["checkpoints/*", "medmoe-finetune/*", STEP_LOG, LOG_FILE]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """FinetuningArguments, DataArguments and RunArguments (training/arguments.py), with fine-tuning's defaults."""
    args = parse((FinetuningArguments, DataArguments, RunArguments), argv, __doc__, FINETUNING_DEFAULTS)
    if args.output_dir is None:
        raise SystemExit("error: fine-tuning needs --output_dir (the adapter or model it writes)")
    return args


def find_classes(stream, label_column: str, rows: int) -> list[str]:
    columns = data_module.stream_columns(stream)
    if label_column not in columns:
        raise ValueError(f"--label_column {label_column!r} is not a column; the stream has {list(columns)}.")
    values = {row[label_column] for row in stream.select_columns([label_column]).take(rows)}
    return sorted(str(value) for value in values if value is not None)


def apply_lora(model, args: argparse.Namespace, modules_to_save: list[str]):
    """Wrap `model` with peft LoRA on `args.lora_target`; new heads in `modules_to_save` train fully."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=[name.strip() for name in args.lora_target.split(",") if name.strip()],
        modules_to_save=modules_to_save or None,
    )
    return get_peft_model(model, config)


def trainable_share(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def build_model(args: argparse.Namespace, classes: list[str]):
    if args.task == "classification":
        model = MedMoEForImageClassification.from_pretrained(
            args.model,
            num_labels=len(classes),
            id2label=dict(enumerate(classes)),
            label2id={name: index for index, name in enumerate(classes)},
        )
        new_heads = ["classifier"]
    else:
        model = MedMoEModel.from_pretrained(args.model)
        new_heads = []
    if args.lora:
        model = apply_lora(model, args, new_heads)
    return model


def class_indices(batch: dict, label_column: str, classes: list[str]) -> torch.Tensor:
    """Class index per row; -100 (ignored by the loss) for a value not among the classes."""
    index = {name: position for position, name in enumerate(classes)}
    return torch.tensor([index.get(str(value), -100) for value in batch["metadata"][label_column]])


@torch.no_grad()
def evaluate_classifier(model, loader, device, label_column: str, classes: list[str]) -> dict:
    model.eval()
    scores, labels = [], []
    for batch in tqdm(loader, desc="evaluating", leave=False):
        if "pixel_values" not in batch:
            continue
        logits = model(pixel_values=batch["pixel_values"].to(device)).logits
        scores.append(logits.float().softmax(dim=-1).cpu())
        labels.append(class_indices(batch, label_column, classes))
    scores, labels = torch.cat(scores).numpy(), torch.cat(labels).numpy()
    result = classification_results(scores, labels, classes)
    model.train()
    return {
        "accuracy": result["accuracy"],
        "auroc": result.get("auroc", float("nan")),
        "num_samples": int((labels >= 0).sum()),
    }


def task_forward(args: argparse.Namespace, classes: list[str], device: torch.device):
    """`forward(model, batch)` for `train_step`: the classifier's cross-entropy, or the pretraining objective."""
    if args.task == "contrastive":
        return functools.partial(contrastive_forward, device=device)

    def classification_forward(model, batch: dict):
        labels = class_indices(batch, args.label_column, classes).to(device)
        return model(pixel_values=batch["pixel_values"].to(device), labels=labels)

    return classification_forward


def evaluate_contrastive(model, loader, device, args) -> dict:
    """Retrieval and routing as training/evaluation_metrics.py defines them (pretraining's held-out figures)."""
    dataset = dataset_description(args.dataset_name, args.eval_files, args.eval_split, args.dataset_card_name)
    results = evaluate_retrieval_and_routing(model, loader, device, model.config.expert_names, dataset)
    return {**results["metrics"], "num_samples": results["num_samples"]}


def main(argv: list[str] | None = None) -> dict:
    """Fine-tuning, step by step: the run (accelerator, output folder, logging, seed), processor, data and classes,
    the model (LoRA-wrapped or not), loaders, optimizer and schedule, resume, the loop, then evaluate, save and
    upload."""
    args = parse_args(argv)
    run = TrainingRun(args, project="medmoe-finetune")
    accelerator = run.accelerator
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    options = DataArguments.from_args(args)
    train_stream, image_column, text_column = data_module.open_stream(options, "train")
    classes = (
        find_classes(train_stream, args.label_column, args.class_scan_rows) if args.task == "classification" else []
    )
    model = build_model(args, classes)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    trainable, total = trainable_share(model)
    mode = f"{args.task} with LoRA" if args.lora else f"{args.task}, all weights"
    logger.info(f"{mode}: trainable {100 * trainable / total:.1f}% ({trainable:,} of {total:,} parameters)")
    if classes:
        logger.info(f"classes from {args.label_column!r}: {classes}")

    expert_names = list((model.get_base_model() if args.lora else model).config.expert_names)
    keep = (args.label_column,) if args.task == "classification" else ()
    train_loader, eval_loader = data_module.script_loaders(
        options, data_module.LoaderSettings.from_args(args), processor, train_stream, image_column, text_column,
        expert_names, accelerator.process_index, accelerator.num_processes, keep,
    )  # fmt: skip
    optimizer, scheduler = run.optimizer_and_schedule(model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    progress = run.resume_or_start()
    run.start_trackers()

    def log(step, out, meter, bar):
        run.log_step(step, {"loss": out.loss}, scheduler, meter, bar)

    run.train(model, optimizer, scheduler, train_loader, task_forward(args, classes, accelerator.device), progress,
              description=f"fine-tuning ({args.task})", log=log)  # fmt: skip

    summary = {}
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if eval_loader is None:
            metrics = {}
            logger.info("No evaluation: pass --eval_files (or a dataset with an eval split).")
        elif args.task == "classification":
            metrics = evaluate_classifier(unwrapped, eval_loader, accelerator.device, args.label_column, classes)
        else:
            metrics = evaluate_contrastive(unwrapped, eval_loader, accelerator.device, args)
        summary = save_outputs(run, unwrapped, processor, metrics, trainable / total, progress)
    run.end()
    return summary


def logged_losses(run: TrainingRun) -> list[float]:
    """The losses of the step log (every --logging_steps), this run's and, after a resume, the earlier ones'."""
    log_file = run.output_dir / STEP_LOG
    return [json.loads(line)["loss"] for line in log_file.read_text().splitlines()] if log_file.is_file() else []


def save_outputs(run: TrainingRun, model, processor, metrics: dict, share: float, progress) -> dict:
    """The adapter (LoRA) or the model (full), the merged model (--merge) and eval_results.json, written in place
    at once (`TrainingRun.save`); then the upload (--push_to_hub)."""
    args = run.args
    saved = {"adapter" if args.lora else "model": str(args.output_dir)}
    if args.lora and args.merge:
        saved["merged"] = str(args.output_dir / "merged")
    losses = logged_losses(run)
    summary = {
        "task": args.task,
        "lora": args.lora,
        "trainable_share": share,
        "steps": progress.step,
        "skipped_steps": progress.skipped_steps,
        "first_loss": float(np.mean(losses[:10])) if losses else None,
        "last_loss": float(np.mean(losses[-10:])) if losses else None,
        "metrics": metrics,
        "saved": saved,
    }

    def write(folder):
        model.save_pretrained(folder)  # OUTPUT_DIR itself: the adapter (LoRA) or the whole model
        processor.save_pretrained(folder)
        if args.lora and args.merge:
            model.merge_and_unload().save_pretrained(folder / "merged")
            processor.save_pretrained(folder / "merged")
        (folder / "eval_results.json").write_text(json.dumps(summary, indent=2) + "\n")

    run.save(write, progress.step)
    summary.update(run.push(ignore_patterns=RUN_FILES))
    logger.info("Eval: " + ", ".join(f"{key} {value:.4f}" for key, value in metrics.items()
                                      if isinstance(value, float)))  # fmt: skip
    for kind, path in saved.items():
        logger.info(f"Saved {kind}: {path}")
    logger.info(f"Results: {args.output_dir / 'eval_results.json'}; log: {args.output_dir / LOG_FILE}")
    return summary


if __name__ == "__main__":
    try:
        finetune_summary = main()
    except (FileNotFoundError, OutputDirNotEmpty, data_module.NoUsableBatch, NoLoadableCheckpoint,
            ModelFolderNotSaved, ValueError) as error:  # fmt: skip
        sys.exit(f"error: {error}")
    if "hub_upload_error" in finetune_summary:
        sys.exit(f"error: {finetune_summary['hub_upload_error']}")
