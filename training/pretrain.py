"""Pretrain MedMoE on image-report streams.

    accelerate launch training/pretrain.py                      # nano preset on the built-in synthetic stream
    accelerate launch training/pretrain.py --dataset_name ../shared/datasets/realmed --preset small --max_steps 2000

OUTPUT_DIR becomes a complete model folder (weights, code, processor, tokenizer, model card at its root:
AutoModel.from_pretrained(OUTPUT_DIR, trust_remote_code=True) loads it), with the run beside it: checkpoints in
OUTPUT_DIR/checkpoints, the per-step log train_log.jsonl, the run's log run.log, tracker logs in medmoe-pretrain/,
run_summary.json, the learnt vocabulary in tokenizer/ (the Hub upload leaves these out). An earlier run's folder is
never overwritten silently: resume it (--resume_from_checkpoint latest) or pass --overwrite_output_dir.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from pathlib import Path

from transformers import PreTrainedConfig

from medmoe.model_card.generate import write_model_card
from medmoe.training import data as data_module
from medmoe.training.arguments import PretrainingArguments, RunArguments, parse
from medmoe.training.checkpoints import NoLoadableCheckpoint
from medmoe.training.data import DataArguments
from medmoe.training.evaluation_metrics import dataset_description, evaluate_retrieval_and_routing, public_dataset_name
from medmoe.training.loop import contrastive_forward
from medmoe.training.profiling import WARMUP_STEPS, StepProfiler
from medmoe.training.run import LOG_FILE, STEP_LOG, ModelFolderNotSaved, OutputDirNotEmpty, TrainingRun
from medmoe.training.starting_points import (
    PretrainedWeightsUnavailable,
    load_pretrained_text_tower,
    load_pretrained_vision_backbone,
    pretrained_text_config,
    text_tokenizer,
)
from modeling_medmoe import MedMoEConfig, MedMoEImageProcessor, MedMoEModel, MedMoEProcessor

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """PretrainingArguments, DataArguments and RunArguments (training/arguments.py) as one namespace."""
    args = parse((PretrainingArguments, DataArguments, RunArguments), argv, __doc__)
    if args.output_dir is None:
        args.output_dir = Path("outputs") / f"medmoe-{args.preset}"
    if args.config_overrides:
        try:  # fail now, not after the tokenizer and the data
            apply_config_overrides(MedMoEConfig.from_preset(args.preset), args.config_overrides)
        except (ValueError, TypeError) as error:
            sys.exit(f"error: {error}")
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
RUN_FILES = ["checkpoints/*", "tokenizer/*", "medmoe-pretrain/*", STEP_LOG, LOG_FILE, "run_summary.json"]
HEADLINE_METRICS = (
    "retrieval/image_to_text_R@5",
    "retrieval/text_to_image_R@5",
    "retrieval/image_to_text_R@10",
    "routing/purity",
)
LOSS_PARTS = ("loss", "global_loss", "local_loss", "report_type_loss", "router_loss", "load_balance_loss")


def log_step(run: TrainingRun, out, scheduler, meter, step: int, model, bar) -> None:
    """The loss parts and the logit scale to the step log and trackers, expert usage to the progress bar
    (`TrainingRun.log_step` adds the learning rate and images/s)."""
    values = {name: getattr(out, name) for name in LOSS_PARTS if getattr(out, name) is not None}
    values["logit_scale"] = model.logit_scale.exp()

    def postfix(logs: dict) -> dict:
        usage = "/".join(str(meter.expert_counts.get(index, 0)) for index in range(model.config.num_experts))
        return {"glob": f"{logs['global_loss']:.3f}", "local": f"{logs.get('local_loss', 0):.3f}", "experts": usage}

    run.log_step(step, values, scheduler, meter, bar, postfix)


def main(argv: list[str] | None = None) -> dict:
    """Pretraining, step by step: the run (accelerator, output folder, logging, seed), data, tokenizer, model,
    loaders, optimizer and schedule, resume, the loop, then save and upload."""
    args = parse_args(argv)
    run = TrainingRun(args, project="medmoe-pretrain")
    accelerator = run.accelerator
    options = DataArguments.from_args(args)
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
    optimizer, scheduler = run.optimizer_and_schedule(model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    progress = run.resume_or_start()
    run_config = run.start_trackers()
    logger.info(run_description(args, accelerator, model, image_column, text_column))
    evaluations, train_seconds = training_loop(run, model, optimizer, scheduler, train_loader, eval_loader, progress)
    summary = {}
    state_dict = accelerator.get_state_dict(model)  # every process takes part: FSDP gathers the full weights
    if accelerator.is_main_process:
        summary = finish(
            run, accelerator.unwrap_model(model), state_dict, processor, evaluations, progress, run_config,
            train_seconds,
        )  # fmt: skip
    run.end()
    return summary


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


def run_description(args, accelerator, model, image_column: str, text_column: str) -> str:
    parameters = sum(parameter.numel() for parameter in accelerator.unwrap_model(model).parameters())
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    return (
        f"MedMoE {args.preset}: {parameters / 1e6:.2f}M parameters, {accelerator.num_processes} process(es) on "
        f"{accelerator.device}, global batch {global_batch}, {args.max_steps} steps; data: "
        f"{args.train_files or args.dataset_name} (image column {image_column!r}, text column {text_column!r})"
    )


def training_loop(run: TrainingRun, model, optimizer, scheduler, train_loader, eval_loader, progress):
    """Train until --max_steps or the --max_train_minutes budget (`TrainingRun.train`), logging, evaluating the
    held-out rows and checkpointing on the way. Returns (the held-out evaluations, the loop's seconds)."""
    args, accelerator = run.args, run.accelerator
    unwrapped = accelerator.unwrap_model(model)
    eval_dataset = dataset_description(args.dataset_name, args.eval_files, args.eval_split, args.dataset_card_name)
    evaluations = []

    def log(step, out, meter, bar):
        log_step(run, out, scheduler, meter, step, unwrapped, bar)

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
            logger.info(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in headline.items()))
        accelerator.wait_for_everyone()

    seconds = run.train(
        model, optimizer, scheduler, train_loader, functools.partial(contrastive_forward, device=accelerator.device),
        progress, description="pretraining", log=log, evaluate=evaluate if eval_loader is not None else None,
        profiler=StepProfiler(unwrapped, progress.step + WARMUP_STEPS, args.profile_steps, args.output_dir),
    )  # fmt: skip
    return evaluations, seconds


def finish(run: TrainingRun, model, state_dict, processor, evaluations, progress, run_config, train_seconds) -> dict:
    """Save the model folder (--output_dir itself) and its card, log the quality figures and the skipped rows,
    write the run summary, upload if asked."""
    args = run.args
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

    run.save(write_model_folder, progress.step)

    if final:
        log_held_out_summary(final)
    else:
        logger.info("No held-out evaluation: pass --eval_files (or a dataset with an eval split).")
    skipped = ", ".join(f"{reason} {count}" for reason, count in progress.skipped_rows.most_common())
    logger.info(f"Skipped rows: {skipped or 'none'}; skipped (non-finite) steps: {progress.skipped_steps}")
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
    summary.update(run.push(ignore_patterns=RUN_FILES))
    (output_dir / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info(f"Model folder: {output_dir}  (load with AutoModel.from_pretrained(..., trust_remote_code=True))")
    logger.info(f"Run summary: {output_dir / 'run_summary.json'}; per-step log: {output_dir / STEP_LOG}; "
                f"log: {output_dir / LOG_FILE}")  # fmt: skip
    return summary


def log_held_out_summary(results: dict) -> None:
    """Routing purity and image->text R@5 against chance, from `evaluation` results."""
    metrics, retrieval, routing = results["metrics"], results["details"]["retrieval"], results["details"]["routing"]
    recall, chance = metrics["retrieval/image_to_text_R@5"], retrieval["chance_R@5"]
    pool, distinct = retrieval["pool_size"], retrieval["distinct_reports"]
    lines = [f"Held-out evaluation (pool: {pool} pairs, {distinct} distinct reports):"]
    if "routing/purity" in metrics:
        lines.append(f"  routing purity vs {routing['truth']}: {metrics['routing/purity']:.3f}  (goal >= 0.9)")
    lines.append(f"  image->text R@5: {recall:.3f} = {recall / chance:.1f}x chance ({chance:.3f})  (goal >= 3x)")
    logger.info("\n".join(lines))


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
        sys.exit(f"error: {run_summary['hub_upload_error']}")
