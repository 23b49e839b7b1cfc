"""What a training run does around its model and data, written once for pretraining and fine-tuning, in the order a
run needs it: the accelerator, the output-folder guard, logging, the seed; the optimizer and schedule; resume; the
trackers; the loop with its logging and checkpoints; the atomic save of the result; the Hub upload.

    run = TrainingRun(args, project="medmoe-pretrain")        # args: RunArguments' fields (training/arguments.py)
    optimizer, scheduler = run.optimizer_and_schedule(model)
    model, optimizer, scheduler = run.accelerator.prepare(model, optimizer, scheduler)
    progress = run.resume_or_start()
    run_config = run.start_trackers()
    seconds = run.train(model, optimizer, scheduler, train_loader, forward, progress, ...)
    run.save(write_folder, progress.step)                      # into OUTPUT_DIR only once every file is written
    run.push(ignore_patterns=RUN_FILES)
    run.end()
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from accelerate import DistributedDataParallelKwargs
from accelerate.utils import set_seed
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import get_scheduler

from medmoe.training.accelerator import accelerator_for_this_machine
from medmoe.training.checkpoints import (
    TrainingProgress,
    checkpoint_steps,
    remove_partial_checkpoints,
    resume_checkpoint,
    save_checkpoint,
)
from medmoe.training.hub import UploadFailed, push_folder
from medmoe.training.logs import LOG_FILE, setup_logging
from medmoe.training.loop import LoopSchedule, ThroughputMeter, build_optimizer, run_training

logger = logging.getLogger(__name__)

STEP_LOG = "train_log.jsonl"  # one JSON line per logged step: losses, learning rate, images/s


class OutputDirNotEmpty(RuntimeError):
    """--output_dir holds an earlier run, and neither --resume_from_checkpoint nor --overwrite_output_dir was given."""


class ModelFolderNotSaved(RuntimeError):
    """The final folder could not be written (a full disk, say); the message names it."""


STAGING = ".tmp_model"


class TrainingRun:
    """A training run of `args` (RunArguments' fields) writing into args.output_dir; `project` names its trackers'
    project (e.g. medmoe-pretrain)."""

    def __init__(self, args, project: str):
        self.args, self.project = args, project
        self.output_dir: Path = args.output_dir
        self.accelerator = accelerator_for_this_machine(
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with=None if args.report_to == "none" else args.report_to,
            project_dir=str(self.output_dir),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and self.accelerator.distributed_type != "FSDP":
            raise SystemExit(
                "The accelerate config asks for FSDP, but accelerate runs FSDP on GPUs only: here it would train as "
                f"{self.accelerator.distributed_type.value} without sharding. On CPUs use "
                "training/configs/cpu_two_processes.yaml (data parallel), or FSDP2 under torchrun."
            )
        self.prepare_output_dir()
        setup_logging(args.log_level, self.accelerator.is_main_process, self.output_dir / LOG_FILE)
        set_seed(args.seed, device_specific=False)

    def prepare_output_dir(self) -> None:
        """--output_dir becomes the result folder. An earlier run's folder is never silently overwritten: resume it,
        or pass --overwrite_output_dir to empty it first (as transformers' example scripts do)."""
        args, output_dir = self.args, self.output_dir
        earlier_run = output_dir.is_dir() and any(output_dir.iterdir())
        if earlier_run and not args.resume_from_checkpoint and not args.overwrite_output_dir:
            raise OutputDirNotEmpty(
                f"{output_dir} is not empty: it holds an earlier run (its model, checkpoints or logs). Pass "
                "--resume_from_checkpoint latest to continue that run, --overwrite_output_dir to delete it and start "
                "over, or another --output_dir."
            )
        if self.accelerator.is_main_process:
            if earlier_run and args.overwrite_output_dir and not args.resume_from_checkpoint:
                shutil.rmtree(output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()

    def optimizer_and_schedule(self, model):
        """AdamW (`loop.build_optimizer`) and the --lr_scheduler_type schedule over --max_steps with --warmup_steps;
        a prepared scheduler steps once per process at every optimizer step, hence the scaling."""
        args, processes = self.args, self.accelerator.num_processes
        optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
        scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer,
            num_warmup_steps=args.warmup_steps * processes,
            num_training_steps=args.max_steps * processes,
        )
        return optimizer, scheduler

    def resume_or_start(self) -> TrainingProgress:
        """The progress of the checkpoint named by --resume_from_checkpoint (model, optimizer, schedule, RNG and
        stream position restored; `latest` falls back to the newest checkpoint that loads), or a fresh start. Partial
        checkpoint writes of an earlier run are removed, and its step log keeps the steps up to the checkpoint."""
        progress = TrainingProgress()
        checkpoints_dir = self.output_dir / "checkpoints"
        if self.accelerator.is_main_process:
            for partial in remove_partial_checkpoints(checkpoints_dir):
                logger.info(f"Removed {partial} (a checkpoint write that was cut short).")
        self.accelerator.wait_for_everyone()
        if self.args.resume_from_checkpoint:
            resume_from = self.args.resume_from_checkpoint
            checkpoint = resume_checkpoint(self.accelerator, resume_from, checkpoints_dir, progress)
            logger.info(f"Resumed from {checkpoint} at step {progress.step} (epoch {progress.epoch}).")
            if self.accelerator.is_main_process:
                keep_logged_steps_up_to(self.output_dir / STEP_LOG, progress.step)
        return progress

    def start_trackers(self) -> dict:
        """The run's configuration, as the trackers (and args.json) record it."""
        run_config = {
            **{key: (str(value) if isinstance(value, Path) else value) for key, value in vars(self.args).items()},
            "num_processes": self.accelerator.num_processes,
            "mixed_precision": self.accelerator.mixed_precision,
        }
        scalars = {key: value for key, value in run_config.items() if isinstance(value, (int, float, str, bool))}
        self.accelerator.init_trackers(self.project, config=scalars)
        return run_config

    def log_step(self, step: int, values: dict, scheduler, meter: ThroughputMeter, bar,
                 postfix: Callable[[dict], dict] | None = None) -> dict:  # fmt: skip
        """`values` (tensors, each averaged over processes), the learning rate and images/s: to the trackers, the step
        log (OUTPUT_DIR/train_log.jsonl) and the progress bar (with `postfix(logs)`); returns them."""
        reduce = self.accelerator.reduce
        logs = {
            "step": step,
            **{name: reduce(value.detach(), reduction="mean").item() for name, value in values.items()},
            "lr": scheduler.get_last_lr()[0],
            "images_per_s": meter.images_per_second(),
        }
        self.accelerator.log(logs, step=step)
        if self.accelerator.is_main_process:
            with (self.output_dir / STEP_LOG).open("a") as handle:
                handle.write(json.dumps(logs) + "\n")
            bar.set_postfix(loss=f"{logs['loss']:.3f}", img_s=f"{logs['images_per_s']:.0f}",
                            **(postfix(logs) if postfix else {}))  # fmt: skip
        return logs

    def train(self, model, optimizer, scheduler, train_loader, forward: Callable, progress: TrainingProgress, *,
              description: str, log: Callable, evaluate: Callable | None = None, profiler=None) -> float:  # fmt: skip
        """`loop.run_training` until --max_steps or --max_train_minutes, with the run's logging cadence, `evaluate`
        every --eval_steps and a checkpoint every --checkpointing_steps; returns the loop's seconds."""
        args = self.args

        def checkpoint(step: int) -> None:
            save_checkpoint(self.accelerator, self.output_dir / "checkpoints", progress, args.checkpoints_total_limit)

        schedule = LoopSchedule(
            args.max_steps, args.max_train_minutes, args.logging_steps, args.eval_steps, args.checkpointing_steps
        )
        with logging_redirect_tqdm():  # log lines above the progress bar, not through it
            return run_training(
                self.accelerator, model, optimizer, scheduler, train_loader, forward, schedule, progress,
                max_grad_norm=args.max_grad_norm, description=description, log=log, evaluate=evaluate,
                checkpoint=checkpoint, profiler=profiler,
            )  # fmt: skip

    def save(self, write: Callable[[Path], None], step: int) -> None:
        """`write(folder)` writes the result's files; they reach OUTPUT_DIR only once all are written
        (`write_into_place`)."""
        write_into_place(self.output_dir, write, step)

    def push(self, ignore_patterns: list[str]) -> dict:
        """Upload OUTPUT_DIR (less `ignore_patterns`) when --push_to_hub: {"hub_commit": URL} or, when the upload
        failed (the folder is kept), {"hub_upload_error": why}; {} without --push_to_hub."""
        args = self.args
        if not args.push_to_hub:
            return {}
        try:
            commit = push_folder(self.output_dir, args.hub_model_id, private=args.hub_private,
                                 ignore_patterns=ignore_patterns)  # fmt: skip
        except UploadFailed as failure:  # the script ends with this message, the folder kept
            return {"hub_upload_error": str(failure)}
        logger.info(f"Uploaded {self.output_dir} (without checkpoints and logs) to https://huggingface.co/"
                    f"{args.hub_model_id}")  # fmt: skip
        return {"hub_commit": commit}

    def end(self) -> None:
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


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


def write_into_place(output_dir: Path, write: Callable[[Path], None], step: int) -> None:
    """`write(folder)` writes a result's files into OUTPUT_DIR/.tmp_model; only when all are written are they renamed
    into `output_dir` (renames need no space), so a failed write (a full disk) leaves an earlier result whole and
    raises ModelFolderNotSaved saying what holds the `step` trained steps."""
    staging = output_dir / STAGING
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
            f"Could not write {output_dir}: {error}. What was already there is as it was; {keep}."
        ) from error
    for entry in sorted(staging.iterdir()):
        target = output_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()
