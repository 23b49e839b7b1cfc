"""Pretrain MedMoE on image-report streams.

    accelerate launch training/pretrain.py                      # nano preset on the built-in synthetic stream
    accelerate launch training/pretrain.py --dataset_name ../shared/datasets/realmed --preset small --max_steps 2000

OUTPUT_DIR becomes a complete model folder (weights, code, processor, tokenizer, model card at its root:
AutoModel.from_pretrained(OUTPUT_DIR, trust_remote_code=True) loads it), with the run beside it: checkpoints in
OUTPUT_DIR/checkpoints, the per-step log train_log.jsonl, tracker logs in medmoe-pretrain/, run_summary.json, the
learnt vocabulary in tokenizer/ (the Hub upload leaves these out). An earlier run's folder is never overwritten
silently: resume it (--resume_from_checkpoint latest) or pass --overwrite_output_dir.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from transformers import PreTrainedConfig, get_scheduler

from model_card.generate import write_model_card
from modeling_medmoe import MedMoEConfig, MedMoEImageProcessor, MedMoEModel, MedMoEProcessor
from training import data as data_module
from training.accelerator import accelerator_for_this_machine
from training.checkpoints import (
    NoLoadableCheckpoint,
    TrainingProgress,
    checkpoint_steps,
    remove_partial_checkpoints,
    resume_checkpoint,
    save_checkpoint,
)
from training.evaluation import dataset_description, evaluate_retrieval_and_routing, public_dataset_name
from training.hub import UploadFailed, push_folder
from training.loop import LoopSchedule, ThroughputMeter, build_optimizer, contrastive_forward, run_training
from training.profiling import WARMUP_STEPS, StepProfiler
from training.towers import (
    PretrainedWeightsUnavailable,
    load_pretrained_text_tower,
    load_pretrained_vision_backbone,
    pretrained_text_config,
    text_tokenizer,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--preset", default="nano", help="nano | small | swin-tiny (see MedMoEConfig.from_preset)")
    model.add_argument(
        "--text_model", help="start the text tower and tokenizer from this BERT-style model (Hub id or path)"
    )
    model.add_argument(
        "--vision_backbone_pretrained", action="store_true", help="load timm's pretrained backbone weights (Hub)"
    )
    model.add_argument(
        "--vision_backbone_weights",
        type=Path,
        help="start the backbone from this local timm checkpoint (.safetensors of the whole timm model; offline)",
    )
    model.add_argument("--router_input", choices=["image", "text", "text_teacher"], help="override the preset's router")
    model.add_argument("--num_experts", type=int, help="number of experts (1 = no mixture)")
    model.add_argument(
        "--expert_names",
        type=lambda names: [name.strip() for name in names.split(",") if name.strip()],
        help="one expert per report type, comma-separated, e.g. the modalities of your data "
        "(default: X-ray,CT,MRI,ultrasound,pathology,fundus); report-type labels index this list",
    )
    model.add_argument("--local_loss_weight", type=float, help="weight of the local loss (0 = global loss only)")
    model.add_argument("--router_loss_weight", type=float, help="weight of the router's cross-entropy")
    model.add_argument("--expert_depth", type=int, help="1 = 1x1 projections (paper Table 3); >1 adds conv blocks")
    model.add_argument(
        "--config_overrides",
        help='override config attributes, sub-configs by dotted name: "vision_config.router_levels=all,'
        'text_config.num_hidden_layers=4" (applied last)',
    )
    model.add_argument("--tokenizer", help="use this tokenizer (folder or Hub id) instead of learning one")
    model.add_argument(
        "--tokenizer_vocab_size", type=int, default=2048, help="WordPiece vocabulary learnt from the data"
    )
    model.add_argument(
        "--tokenizer_training_rows", type=int, default=2000, help="rows whose reports train the tokenizer"
    )
    model.add_argument("--max_length", type=int, default=128, help="report length in tokens")
    model.add_argument("--gradient_checkpointing", action="store_true")

    data_module.add_data_arguments(parser)
    parser.add_argument(
        "--ground_truth_columns",
        default="modality,finding_box,label",
        help="columns kept for evaluation when present (comma-separated)",
    )

    train = parser.add_argument_group("training")
    train.add_argument(
        "--output_dir", type=Path, help="the model folder this run writes (default: outputs/medmoe-PRESET)"
    )
    train.add_argument(
        "--overwrite_output_dir", action="store_true", help="delete an earlier run in --output_dir and start over"
    )
    train.add_argument("--max_steps", type=int, default=400, help="optimizer steps (the schedule's length)")
    train.add_argument(
        "--max_train_minutes", type=float, help="also stop after this much training time (a wall-clock budget)"
    )
    train.add_argument("--per_device_train_batch_size", type=int, default=32)
    train.add_argument("--per_device_eval_batch_size", type=int, default=64)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--learning_rate", type=float, default=2e-3)
    train.add_argument("--weight_decay", type=float, default=0.05)
    train.add_argument("--lr_scheduler_type", default="cosine")
    train.add_argument("--warmup_steps", type=int, default=50)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="default: accelerate's config")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--logging_steps", type=int, default=10)
    train.add_argument("--eval_steps", type=int, default=100, help="evaluate every N steps (0 = only at the end)")
    train.add_argument("--max_eval_samples", type=int, default=384, help="rows of the held-out slice")
    train.add_argument("--checkpointing_steps", type=int, default=0, help="checkpoint every N steps (0 = never)")
    train.add_argument("--checkpoints_total_limit", type=int, default=2, help="keep this many checkpoints (0 = all)")
    train.add_argument("--resume_from_checkpoint", help="latest or a checkpoint folder")
    train.add_argument(
        "--report_to", default="tensorboard", help="accelerate trackers: tensorboard, wandb, all or none"
    )
    train.add_argument(
        "--torch_compile",
        action="store_true",
        help="torch.compile the backbone and the text tower (off by default: BENCHMARKS.md has the speed-up on CPU)",
    )
    train.add_argument(
        "--profile_steps",
        type=int,
        default=0,
        help=f"profile this many steps after {WARMUP_STEPS} warm-up steps: a per-component table in "
        "OUTPUT_DIR/profile.md (0 = off)",
    )

    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="upload the model folder (login or HF_TOKEN)")
    hub.add_argument("--hub_model_id", help="ORG/NAME of the Hub repo")
    hub.add_argument("--hub_private", action="store_true")
    args = parser.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = Path("outputs") / f"medmoe-{args.preset}"
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id ORG/NAME")
    if args.vision_backbone_weights and args.vision_backbone_weights.suffix != ".safetensors":
        parser.error("--vision_backbone_weights takes a .safetensors file (nothing is unpickled)")
    if args.expert_names is not None:
        if args.num_experts not in (None, len(args.expert_names)):
            parser.error(f"--num_experts {args.num_experts} but --expert_names names {len(args.expert_names)} experts")
        if not args.expert_names:
            parser.error("--expert_names needs at least one name")
        if len({name.lower() for name in args.expert_names}) < len(args.expert_names):
            parser.error(f"--expert_names names a report type twice: {args.expert_names}")
        args.num_experts = len(args.expert_names)
    if args.config_overrides:
        try:  # fail now, not after the tokenizer and the data
            apply_config_overrides(MedMoEConfig.from_preset(args.preset), args.config_overrides)
        except (ValueError, TypeError) as error:
            parser.error(str(error))
    return args


def build_config(args: argparse.Namespace, vocab_size: int, text_config=None) -> MedMoEConfig:
    overrides = {
        key: getattr(args, key)
        for key in ("router_input", "num_experts", "expert_names", "local_loss_weight", "router_loss_weight")
        if getattr(args, key) is not None
    }
    config = MedMoEConfig.from_preset(args.preset, **overrides)
    if text_config is not None:
        config.text_config = text_config
    config.text_config.vocab_size = vocab_size
    config.text_config.max_position_embeddings = max(config.text_config.max_position_embeddings, args.max_length)
    if args.expert_depth is not None:
        config.vision_config.expert_depth = args.expert_depth
    if args.config_overrides:
        apply_config_overrides(config, args.config_overrides)
    return config


def apply_config_overrides(config: MedMoEConfig, overrides: str) -> None:
    """Sets "key=value,sub_config.key=value" on `config` or its sub-configs, cast to each attribute's type.

    As `PreTrainedConfig.update_from_string` (whose casting it uses), but reaching into `vision_config` and
    `text_config`; unknown keys and sub-configs are errors, and the architecture is validated again."""
    for assignment in overrides.split(","):  # values hold no commas: config overrides are scalars
        key, separator, value = assignment.strip().partition("=")
        *path, attribute = key.split(".")
        target = config
        for name in path:
            target = getattr(target, name, None)
            if not isinstance(target, PreTrainedConfig):
                raise ValueError(f"--config_overrides: {key!r} names no sub-config ({name!r})")
        if not separator or not hasattr(target, attribute):
            raise ValueError(f"--config_overrides: expected KEY=VALUE with a key the config has, got {assignment!r}")
        target.update_from_string(f"{attribute}={value}")
    config.vision_config.validate_architecture()


# What a run leaves beside the model in --output_dir; the upload leaves them out.
RUN_FILES = ["checkpoints/*", "tokenizer/*", "medmoe-pretrain/*", "train_log.jsonl", "run_summary.json"]
HEADLINE_METRICS = (
    "retrieval/image_to_text_R@5",
    "retrieval/text_to_image_R@5",
    "retrieval/image_to_text_R@10",
    "routing/purity",
)
LOSS_PARTS = ("loss", "global_loss", "local_loss", "report_type_loss", "router_loss", "load_balance_loss")


def log_step(accelerator, out, scheduler, meter: ThroughputMeter, step: int, model, bar, log_file: Path) -> None:
    """Loss parts averaged over processes, learning rate, images/s and expert usage: to the trackers, the progress
    bar and OUTPUT_DIR/train_log.jsonl."""
    parts = {
        name: accelerator.reduce(getattr(out, name).detach(), reduction="mean").item()
        for name in LOSS_PARTS
        if getattr(out, name) is not None
    }
    logs = {
        "step": step,
        **parts,
        "lr": scheduler.get_last_lr()[0],
        "images_per_s": meter.images_per_second(),
        "logit_scale": model.logit_scale.detach().exp().item(),
    }
    accelerator.log(logs, step=step)
    if accelerator.is_main_process:
        with log_file.open("a") as handle:
            handle.write(json.dumps(logs) + "\n")
        usage = "/".join(str(meter.expert_counts.get(index, 0)) for index in range(model.config.num_experts))
        bar.set_postfix(
            loss=f"{parts['loss']:.3f}",
            glob=f"{parts['global_loss']:.3f}",
            local=f"{parts.get('local_loss', 0):.3f}",
            img_s=f"{logs['images_per_s']:.0f}",
            experts=usage,
        )
    meter.reset()


def main(argv: list[str] | None = None) -> dict:
    """Pretraining, step by step: accelerator, output folder, data, tokenizer, model, loaders, optimizer and
    schedule, resume, the loop, then save and upload."""
    args = parse_args(argv)
    accelerator = build_accelerator(args)
    prepare_output_dir(args, accelerator)
    set_seed(args.seed, device_specific=False)
    options = data_module.DataOptions.from_args(args)
    train_stream, image_column, text_column = data_module.open_stream(options, "train")
    with accelerator.main_process_first():
        tokenizer = text_tokenizer(
            args.tokenizer or args.text_model,
            train_stream,
            text_column,
            args.output_dir / "tokenizer",
            accelerator.is_main_process,
            resuming=bool(args.resume_from_checkpoint),
            training_rows=args.tokenizer_training_rows,
            vocab_size=args.tokenizer_vocab_size,
            max_length=args.max_length,
        )
    model, processor = build_model_and_processor(args, tokenizer)
    ground_truth = tuple(column.strip() for column in args.ground_truth_columns.split(",") if column.strip())
    train_loader, eval_loader = data_module.script_loaders(
        options, data_module.LoaderSettings.from_args(args), processor, train_stream, image_column, text_column,
        model.config.expert_names, accelerator.process_index, accelerator.num_processes, ground_truth,
    )  # fmt: skip
    optimizer, scheduler = build_optimizer_and_schedule(args, accelerator, model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    progress = resume_or_start(args, accelerator)
    run_config = start_trackers(args, accelerator)
    accelerator.print(run_description(args, accelerator, model, image_column, text_column))
    evaluations, train_seconds = training_loop(
        args, accelerator, model, optimizer, scheduler, train_loader, eval_loader, progress
    )
    summary = {}
    state_dict = accelerator.get_state_dict(model)  # every process takes part: FSDP gathers the full weights
    if accelerator.is_main_process:
        summary = finish(
            args,
            accelerator.unwrap_model(model),
            state_dict,
            processor,
            evaluations,
            progress,
            run_config,
            train_seconds,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def build_accelerator(args: argparse.Namespace) -> Accelerator:
    accelerator = accelerator_for_this_machine(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=str(args.output_dir),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and accelerator.distributed_type != "FSDP":
        raise SystemExit(
            "The accelerate config asks for FSDP, but accelerate runs FSDP on GPUs only: here it would train as "
            f"{accelerator.distributed_type.value} without sharding. On CPUs use "
            "training/configs/cpu_two_processes.yaml (data parallel), or FSDP2 under torchrun (training/sharding.py)."
        )
    return accelerator


class OutputDirNotEmpty(RuntimeError):
    """--output_dir holds an earlier run, and neither --resume_from_checkpoint nor --overwrite_output_dir was given."""


def prepare_output_dir(args: argparse.Namespace, accelerator) -> None:
    """--output_dir becomes the model folder. An earlier run's folder is never silently overwritten: resume it,
    or pass --overwrite_output_dir to empty it first (as transformers' example scripts do)."""
    output_dir = args.output_dir
    earlier_run = output_dir.is_dir() and any(output_dir.iterdir())
    if earlier_run and not args.resume_from_checkpoint and not args.overwrite_output_dir:
        raise OutputDirNotEmpty(
            f"{output_dir} is not empty: it holds an earlier run (its model, checkpoints or logs). Pass "
            "--resume_from_checkpoint latest to continue that run, --overwrite_output_dir to delete it and start "
            "over, or another --output_dir."
        )
    if accelerator.is_main_process:
        if earlier_run and args.overwrite_output_dir and not args.resume_from_checkpoint:
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()


def build_model_and_processor(args: argparse.Namespace, tokenizer) -> tuple[MedMoEModel, MedMoEProcessor]:
    """The preset's model (its towers started from --text_model / the backbone weights if asked) and the processor
    that feeds it."""
    text_config = pretrained_text_config(args.text_model) if args.text_model else None
    config = build_config(args, len(tokenizer), text_config)
    model = MedMoEModel(config)
    if args.text_model:
        load_pretrained_text_tower(model, args.text_model)
    if args.vision_backbone_pretrained or args.vision_backbone_weights:
        load_pretrained_vision_backbone(model, args.vision_backbone_weights)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    if args.torch_compile:
        model.compile_towers()
    side = config.vision_config.image_size
    processor = MedMoEProcessor(
        image_processor=MedMoEImageProcessor(size={"height": side, "width": side}), tokenizer=tokenizer
    )
    return model, processor


def build_optimizer_and_schedule(args, accelerator, model):
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
    scheduler = get_scheduler(  # a prepared scheduler steps once per process at every optimizer step
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_steps * accelerator.num_processes,
    )
    return optimizer, scheduler


def resume_or_start(args, accelerator) -> TrainingProgress:
    """The progress of the checkpoint named by --resume_from_checkpoint (model, optimizer, schedule, RNG and
    stream position restored; `latest` falls back to the newest checkpoint that loads), or a fresh start. Partial
    checkpoint writes of an earlier run are removed, and its log keeps the steps up to the checkpoint."""
    progress = TrainingProgress()
    checkpoints_dir = args.output_dir / "checkpoints"
    if accelerator.is_main_process:
        for partial in remove_partial_checkpoints(checkpoints_dir):
            print(f"Removed {partial} (a checkpoint write that was cut short).")
    accelerator.wait_for_everyone()
    if args.resume_from_checkpoint:
        checkpoint = resume_checkpoint(accelerator, args.resume_from_checkpoint, checkpoints_dir, progress)
        accelerator.print(f"Resumed from {checkpoint} at step {progress.step} (epoch {progress.epoch}).")
        if accelerator.is_main_process:
            keep_logged_steps_up_to(args.output_dir / "train_log.jsonl", progress.step)
    return progress


def keep_logged_steps_up_to(log_file: Path, step: int) -> None:
    """Drop the log lines of steps after `step` (logged before the run stopped, trained again after the resume),
    so that the log has each step once."""
    if not log_file.is_file():
        return
    lines = [line for line in log_file.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    temporary = log_file.with_suffix(".tmp")
    temporary.write_text("".join(f"{line}\n" for line in kept))
    os.replace(temporary, log_file)


def start_trackers(args, accelerator) -> dict:
    """The run's configuration, as the trackers (and args.json) record it."""
    run_config = {
        **{key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
    }
    scalars = {key: value for key, value in run_config.items() if isinstance(value, (int, float, str, bool))}
    accelerator.init_trackers("medmoe-pretrain", config=scalars)
    return run_config


def run_description(args, accelerator, model, image_column: str, text_column: str) -> str:
    parameters = sum(parameter.numel() for parameter in accelerator.unwrap_model(model).parameters())
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    return (
        f"MedMoE {args.preset}: {parameters / 1e6:.2f}M parameters, {accelerator.num_processes} process(es) on "
        f"{accelerator.device}, global batch {global_batch}, {args.max_steps} steps; data: "
        f"{args.train_files or args.dataset_name} (image column {image_column!r}, text column {text_column!r})"
    )


def training_loop(args, accelerator, model, optimizer, scheduler, train_loader, eval_loader, progress):
    """Train until --max_steps or the --max_train_minutes budget (`loop.run_training`), logging, evaluating the
    held-out rows and checkpointing on the way. Returns (the held-out evaluations, the loop's seconds)."""
    unwrapped = accelerator.unwrap_model(model)
    eval_dataset = dataset_description(args.dataset_name, args.eval_files, args.eval_split, args.dataset_card_name)
    log_file = args.output_dir / "train_log.jsonl"
    evaluations = []

    def log(step, out, meter, bar):
        log_step(accelerator, out, scheduler, meter, step, unwrapped, bar, log_file)

    def evaluate(step, bar):
        if accelerator.is_main_process:
            result = evaluate_retrieval_and_routing(
                unwrapped, eval_loader, accelerator.device, unwrapped.config.expert_names, eval_dataset
            )
            result["step"] = step
            evaluations.append(result)
            metrics = result["metrics"]
            headline = {name: metrics[name] for name in HEADLINE_METRICS if name in metrics}
            accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in headline.items()))
        accelerator.wait_for_everyone()

    def checkpoint(step):
        save_checkpoint(accelerator, args.output_dir / "checkpoints", progress, args.checkpoints_total_limit)

    schedule = LoopSchedule(
        args.max_steps, args.max_train_minutes, args.logging_steps, args.eval_steps, args.checkpointing_steps
    )
    seconds = run_training(
        accelerator,
        model,
        optimizer,
        scheduler,
        train_loader,
        functools.partial(contrastive_forward, device=accelerator.device),
        schedule,
        progress,
        max_grad_norm=args.max_grad_norm,
        description="pretraining",
        log=log,
        evaluate=evaluate if eval_loader is not None else None,
        checkpoint=checkpoint,
        profiler=StepProfiler(unwrapped, progress.step + WARMUP_STEPS, args.profile_steps, args.output_dir),
    )
    return evaluations, seconds


def finish(args, model, state_dict, processor, evaluations, progress, run_config, train_seconds) -> dict:
    """Save the model folder (--output_dir itself) and its card, print the quality figures and the skipped rows,
    write the run summary, upload if asked."""
    output_dir = args.output_dir
    final = {key: value for key, value in (evaluations[-1] if evaluations else {}).items() if key != "step"}
    train_facts = {
        **public_run_config(run_config),
        "steps_trained": progress.step,
        "images_seen": progress.images_seen,
        "train_minutes": round(train_seconds / 60, 1),
        "stopped_by": "max_steps" if progress.step >= args.max_steps else "max_train_minutes",
    }

    def write_model_folder(folder: Path) -> None:
        model.save_pretrained(folder, state_dict=state_dict)
        processor.save_pretrained(folder)
        (folder / "args.json").write_text(json.dumps(train_facts, indent=2) + "\n")
        (folder / "eval_results.json").write_text(json.dumps(final, indent=2) + "\n")
        write_model_card(
            folder, final, train_facts, repo_id=args.hub_model_id or str(output_dir), model_name=output_dir.name
        )

    write_into_place(output_dir, write_model_folder, progress.step)

    if final:
        print_held_out_summary(final)
    else:
        print("\nNo held-out evaluation: pass --eval_files (or a dataset with an eval split).")
    skipped = ", ".join(f"{reason} {count}" for reason, count in progress.skipped_rows.most_common())
    print(f"Skipped rows: {skipped or 'none'}; skipped (non-finite) steps: {progress.skipped_steps}")
    summary = {
        "model_dir": str(output_dir),
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "steps": progress.step,
        "images_seen": progress.images_seen,
        "train_seconds": round(train_seconds, 1),  # this process's training loop, evaluations included
        "skipped_rows": dict(progress.skipped_rows),
        "skipped_steps": progress.skipped_steps,
        "evaluations": evaluations,
    }
    if args.push_to_hub:
        try:
            summary["hub_commit"] = push_folder(
                output_dir, args.hub_model_id, private=args.hub_private, ignore_patterns=RUN_FILES
            )
            print(f"Uploaded {output_dir} (without checkpoints and logs) to https://huggingface.co/{args.hub_model_id}")
        except UploadFailed as failure:
            summary["hub_upload_error"] = str(failure)
            print(f"Upload failed: {failure}", file=sys.stderr)
    (output_dir / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"Model folder: {output_dir}  (load with AutoModel.from_pretrained(..., trust_remote_code=True))")
    print(f"Run summary: {output_dir / 'run_summary.json'}; per-step log: {output_dir / 'train_log.jsonl'}")
    return summary


class ModelFolderNotSaved(RuntimeError):
    """The final model folder could not be written (a full disk, say); the message names it."""


MODEL_STAGING = ".tmp_model"


def write_into_place(output_dir: Path, write: Callable[[Path], None], step: int) -> None:
    """`write(folder)` writes the model files into OUTPUT_DIR/.tmp_model; only when all are written are they renamed
    into OUTPUT_DIR (renames need no space), so a failed write leaves an earlier model there whole."""
    staging = output_dir / MODEL_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        write(staging)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        checkpoints = checkpoint_steps(output_dir / "checkpoints")
        keep = (
            f"the checkpoint of step {checkpoints[-1]} holds the training state (free space, then rerun with "
            "--resume_from_checkpoint latest)"
            if checkpoints
            else f"no checkpoint holds the {step} trained steps (pass --checkpointing_steps to keep them next time)"
        )
        raise ModelFolderNotSaved(
            f"Could not write the model folder {output_dir}: {error}. Any model already there is as it was; {keep}."
        ) from error
    for entry in sorted(staging.iterdir()):
        target = output_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()


def print_held_out_summary(results: dict) -> None:
    """Routing purity and image->text R@5 against chance, from `evaluation` results."""
    metrics, retrieval, routing = results["metrics"], results["details"]["retrieval"], results["details"]["routing"]
    recall, chance = metrics["retrieval/image_to_text_R@5"], retrieval["chance_R@5"]
    pool, distinct = retrieval["pool_size"], retrieval["distinct_reports"]
    print(f"\nHeld-out evaluation (pool: {pool} pairs, {distinct} distinct reports):")
    if "routing/purity" in metrics:
        print(f"  routing purity vs {routing['truth']}: {metrics['routing/purity']:.3f}  (goal >= 0.9)")
    print(f"  image->text R@5: {recall:.3f} = {recall / chance:.1f}x chance ({chance:.3f})  (goal >= 3x)")


LOCAL_PATH_ARGUMENTS = ("output_dir", "tokenizer", "text_model", "resume_from_checkpoint", "vision_backbone_weights")


def public_run_config(run_config: dict) -> dict:
    """The run's arguments as they may be published with the model: the data by name (`public_dataset_name`), and
    local folders (output, tokenizer, text model, checkpoint) by their last component only."""
    public = {key: value for key, value in run_config.items() if key not in ("train_files", "eval_files")}
    public["dataset_name"] = public_dataset_name(
        run_config["dataset_name"], run_config.get("train_files"), run_config.get("dataset_card_name")
    )
    for key in LOCAL_PATH_ARGUMENTS:
        value = public.get(key)
        if value and (Path(value).exists() or str(value).startswith((".", "/", "~"))):
            public[key] = Path(value).name
    return public


if __name__ == "__main__":
    try:
        run_summary = main()
    except (
        PretrainedWeightsUnavailable,
        FileNotFoundError,
        OutputDirNotEmpty,
        data_module.NoUsableBatch,
        NoLoadableCheckpoint,
        ModelFolderNotSaved,
    ) as error:
        sys.exit(f"error: {error}")
    if "hub_upload_error" in run_summary:
        sys.exit(1)
