"""Fine-tune a pretrained MedMoE folder: image classification or image-report contrastive, fully or with LoRA.

    accelerate launch training/finetune.py --model outputs/medmoe-nano --task classification \
        --label_column modality --lora --output_dir outputs/finetune-nano
    accelerate launch training/finetune.py --model outputs/medmoe-realmed --task contrastive --lora \
        --dataset_name ../shared/datasets/realmed --output_dir outputs/finetune-realmed

OUTPUT_DIR itself is the result, as in transformers' and peft's example scripts: the adapter (LoRA; load it with
PeftModel.from_pretrained on the base) or the whole model (full fine-tuning), with the processor and
eval_results.json; --merge also writes the merged model to OUTPUT_DIR/merged.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np
import torch
from accelerate import DistributedDataParallelKwargs
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoProcessor, get_scheduler

from modeling_medmoe import MedMoEForImageClassification, MedMoEModel
from training import data as data_module
from training.accelerator import accelerator_for_this_machine
from training.checkpoints import TrainingProgress
from training.evaluation import dataset_description, evaluate_retrieval_and_routing
from training.loop import LoopSchedule, build_optimizer, contrastive_forward, run_training
from training.metrics import classification_results

# Our own module names: Swin attention (qkv, attn.proj), BERT attention (query, value) and the projections.
DEFAULT_LORA_TARGETS = ("qkv", "attn.proj", "query", "value", "image_projection", "text_projection")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pretrained MedMoE folder or Hub id")
    parser.add_argument("--task", choices=["classification", "contrastive"], default="classification")
    parser.add_argument("--output_dir", required=True, type=Path)
    parser.add_argument("--label_column", default="modality", help="the class column (classification)")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_alpha", type=int, default=16)
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    parser.add_argument("--lora_target", default=",".join(DEFAULT_LORA_TARGETS), help="comma-separated module names")
    parser.add_argument("--merge", action="store_true", help="also save the LoRA weights merged into the model")
    data_module.add_data_arguments(parser)
    parser.add_argument("--class_scan_rows", type=int, default=5000, help="train rows read to find the classes")
    train = parser.add_argument_group("training")
    train.add_argument("--max_steps", type=int, default=200)
    train.add_argument("--per_device_train_batch_size", type=int, default=16)
    train.add_argument("--per_device_eval_batch_size", type=int, default=64)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0 = none)")
    train.add_argument("--learning_rate", type=float, default=5e-4)
    train.add_argument("--weight_decay", type=float, default=0.01)
    train.add_argument("--warmup_steps", type=int, default=10)
    train.add_argument("--max_eval_samples", type=int, default=1000)
    train.add_argument("--max_length", type=int, default=128)
    train.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


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
    """Retrieval and routing as training/evaluation.py defines them (the pretraining held-out check's figures)."""
    dataset = dataset_description(args.dataset_name, args.eval_files, args.eval_split, args.dataset_card_name)
    results = evaluate_retrieval_and_routing(model, loader, device, model.config.expert_names, dataset)
    return {**results["metrics"], "num_samples": results["num_samples"]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = accelerator_for_this_machine(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(args.seed, device_specific=False)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    options = data_module.DataOptions.from_args(args)
    train_stream, image_column, text_column = data_module.open_stream(options, "train")
    classes = (
        find_classes(train_stream, args.label_column, args.class_scan_rows) if args.task == "classification" else []
    )
    model = build_model(args, classes)
    trainable, total = trainable_share(model)
    mode = f"{args.task} with LoRA" if args.lora else f"{args.task}, all weights"
    accelerator.print(f"{mode}: trainable {100 * trainable / total:.1f}% ({trainable:,} of {total:,} parameters)")
    if classes:
        accelerator.print(f"classes from {args.label_column!r}: {classes}")

    expert_names = list((model.get_base_model() if args.lora else model).config.expert_names)
    keep = (args.label_column,) if args.task == "classification" else ()

    train_loader, eval_loader = data_module.script_loaders(
        options, data_module.LoaderSettings.from_args(args), processor, train_stream, image_column, text_column,
        expert_names, accelerator.process_index, accelerator.num_processes, keep,
    )  # fmt: skip
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
    scheduler = get_scheduler(
        "cosine", optimizer, args.warmup_steps * accelerator.num_processes, args.max_steps * accelerator.num_processes
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    forward = task_forward(args, classes, accelerator.device)
    losses, progress = [], TrainingProgress()

    def log(step, out, meter, bar):
        losses.append(accelerator.reduce(out.loss.detach(), reduction="mean").item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")

    run_training(
        accelerator,
        model,
        optimizer,
        scheduler,
        train_loader,
        forward,
        LoopSchedule(args.max_steps),
        progress,
        max_grad_norm=args.max_grad_norm,
        description=f"fine-tuning ({args.task})",
        log=log,
    )

    summary = {}
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if eval_loader is None:
            metrics = {}
            print("No evaluation: pass --eval_files (or a dataset with an eval split).")
        elif args.task == "classification":
            metrics = evaluate_classifier(unwrapped, eval_loader, accelerator.device, args.label_column, classes)
        else:
            metrics = evaluate_contrastive(unwrapped, eval_loader, accelerator.device, args)
        summary = save_outputs(args, unwrapped, processor, metrics, losses, trainable / total, progress.skipped_steps)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def save_outputs(args, model, processor, metrics: dict, losses: list[float], share: float, skipped_steps: int) -> dict:
    """The adapter (LoRA) or the model (full), the merged model (--merge), and eval_results.json."""
    args.output_dir.mkdir(parents=True, exist_ok=True)
    saved = {}
    model.save_pretrained(args.output_dir)  # OUTPUT_DIR itself: the adapter (LoRA) or the whole model
    processor.save_pretrained(args.output_dir)
    saved["adapter" if args.lora else "model"] = str(args.output_dir)
    if args.lora and args.merge:
        merged_dir = args.output_dir / "merged"
        model.merge_and_unload().save_pretrained(merged_dir)
        processor.save_pretrained(merged_dir)
        saved["merged"] = str(merged_dir)
    summary = {
        "task": args.task,
        "lora": args.lora,
        "trainable_share": share,
        "steps": len(losses),
        "skipped_steps": skipped_steps,
        "first_loss": float(np.mean(losses[:10])) if losses else None,
        "last_loss": float(np.mean(losses[-10:])) if losses else None,
        "metrics": metrics,
        "saved": saved,
    }
    (args.output_dir / "eval_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("Eval: " + ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if isinstance(value, float)))
    for kind, path in saved.items():
        print(f"Saved {kind}: {path}")
    print(f"Results: {args.output_dir / 'eval_results.json'}")
    return summary


if __name__ == "__main__":
    main()
