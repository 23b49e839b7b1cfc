"""The training loop every training script runs (pretraining, fine-tuning, the open_clip baseline) and its
optimisation step: batches epoch after epoch, one micro-batch forward and backward, gradient accumulation, clipping,
a guard that skips non-finite steps on every process alike, the progress bar, images/s, the step and time stops, and
the cadence of logging, held-out evaluation and checkpointing (each a function the script passes)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate.utils import broadcast
from tqdm.auto import tqdm

from medmoe.training.checkpoints import TrainingProgress
from medmoe.training.data import batches_forever
from medmoe.training.evaluation_embeddings import model_inputs
from medmoe.training.profiling import section

logger = logging.getLogger(__name__)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups for the trainable parameters: no weight decay on biases, norms and the logit scale."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over `parameter_groups`, fused (one kernel for all parameters instead of a loop over them)."""
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=learning_rate, fused=True)


def contrastive_forward(model, batch: dict, device: torch.device):
    """MedMoE's pretraining objective on a batch from `data.build_loader`: the output with `loss` and its parts."""
    return model(
        **model_inputs(batch, device),
        report_type_labels=batch["report_type_labels"].to(device),
        return_loss=True,
    )


def all_finite(accelerator, value: torch.Tensor) -> bool:
    """True when `value` is finite on every process (so all processes take the same branch)."""
    flag = torch.isfinite(value.detach()).all().float().reshape(1).to(accelerator.device)
    return bool(accelerator.gather(flag).min() > 0)


def train_step(
    accelerator,
    model,
    batch: dict,
    optimizer,
    scheduler,
    max_grad_norm: float,
    cycle_finite: bool,
    forward: Callable,
):
    """One micro-batch: `forward(model, batch)` (an output with `.loss`), backward, and at the end of an
    accumulation cycle the clipped optimizer and scheduler step.

    A non-finite loss (on any process) is not back-propagated; a non-finite gradient norm, or any non-finite
    micro-batch in the cycle, skips the optimizer and scheduler step on every process. Returns the output and
    whether the cycle is still finite (`accelerator.sync_gradients` tells whether the cycle ended).
    """
    with accelerator.accumulate(model):
        out = forward(model, batch)
        cycle_finite = cycle_finite and all_finite(accelerator, out.loss)
        if cycle_finite:
            accelerator.backward(out.loss)
        if accelerator.sync_gradients:
            with section("optimizer (clip + AdamW)"):
                cycle_finite = optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm, cycle_finite)
    return out, cycle_finite


def optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm: float, cycle_finite: bool) -> bool:
    """The end of an accumulation cycle: clip, then step the optimizer and the schedule unless the cycle or the
    gradient norm is non-finite (on any process); gradients are cleared either way. Returns whether it stepped."""
    if cycle_finite:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
        cycle_finite = all_finite(accelerator, norm)
    if cycle_finite:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return cycle_finite


class ThroughputMeter:
    """Images per second and expert usage since the last log line."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.images, self.expert_counts = time.perf_counter(), 0, Counter()

    def add(self, images: int, expert_index: torch.Tensor | None) -> None:
        self.images += images
        if expert_index is not None:
            self.expert_counts.update(expert_index.tolist())

    def images_per_second(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (held-out evaluation, checkpointing) does not count against the training images/s."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began


class TrainingDeadline:
    """A wall-clock budget for the training loop, counted from its creation; the main process's clock decides for
    every process, so all of them stop after the same step."""

    def __init__(self, minutes: float | None, accelerator):
        self.start = time.monotonic()
        self.end = self.start + 60 * minutes if minutes else None
        self.accelerator = accelerator

    def elapsed_seconds(self) -> float:
        return time.monotonic() - self.start

    def passed(self) -> bool:
        if self.end is None:
            return False
        flag = torch.tensor([float(time.monotonic() >= self.end)], device=self.accelerator.device)
        return bool(broadcast(flag, from_process=0).item())


@dataclass
class LoopSchedule:
    """When the loop stops (`max_steps` optimizer steps, or `max_train_minutes` of training) and how often it calls
    the script's functions: every N steps (0 = only at the last step for logging, never for the others, except
    that evaluation and checkpointing also run at the last step when they run at all)."""

    max_steps: int
    max_train_minutes: float | None = None
    logging_steps: int = 1
    eval_steps: int = 0
    checkpointing_steps: int = 0


def is_due(every: int, step: int, is_last: bool) -> bool:
    return is_last or (every > 0 and step % every == 0)


def run_training(
    accelerator,
    model,
    optimizer,
    scheduler,
    train_loader,
    forward: Callable,
    schedule: LoopSchedule,
    progress: TrainingProgress,
    *,
    max_grad_norm: float,
    description: str,
    after_step: Callable | None = None,
    log: Callable | None = None,
    evaluate: Callable | None = None,
    checkpoint: Callable | None = None,
    profiler=None,
) -> float:
    """Train until `schedule.max_steps` optimizer steps (counted in `progress`, which also counts images, skipped
    rows and skipped steps) or its time budget; returns the loop's seconds.

    After each optimizer step: `after_step(step, out, bar)`; when due, `log(step, out, meter, bar)` (the meter then
    restarts), `evaluate(step, bar)` and `checkpoint(step)` (their time is left out of images/s). `forward(model,
    batch)` returns an output with `.loss` (and `.expert_index` to count expert usage). `profiler`: a
    `StepProfiler` whose table is printed when its window ends.
    """
    bar = tqdm(total=schedule.max_steps, initial=progress.step, desc=description,
               disable=not accelerator.is_main_process)  # fmt: skip
    meter = ThroughputMeter()
    deadline = TrainingDeadline(schedule.max_train_minutes, accelerator)
    data = batches_forever(train_loader, progress)
    cycle_finite = True  # False once a micro-batch of the current accumulation cycle was non-finite
    model.train()
    while progress.step < schedule.max_steps:
        if profiler is not None:
            profiler.step_begins(progress.step)
        with section("data wait"):
            batch = next(data)
        progress.skipped_rows.update(batch["skipped"])
        if "pixel_values" not in batch:
            continue
        out, cycle_finite = train_step(
            accelerator, model, batch, optimizer, scheduler, max_grad_norm, cycle_finite, forward
        )
        images = batch["pixel_values"].shape[0] * accelerator.num_processes
        progress.images_seen += images
        meter.add(images, getattr(out, "expert_index", None))
        if not accelerator.sync_gradients:
            continue
        if not cycle_finite:
            progress.skipped_steps += 1
            cycle_finite = True
            logger.warning(
                f"step {progress.step + 1}: non-finite loss or gradient, step skipped ({progress.skipped_steps} so far)"
            )
            accelerator.log({"skipped_steps": progress.skipped_steps}, step=progress.step)
            continue
        progress.step += 1
        bar.update(1)
        if profiler is not None and (table := profiler.step_ended(progress.step)):
            logger.info(f"{table}\n(written to {profiler.output_dir / 'profile.md'})")
        if after_step is not None:
            after_step(progress.step, out, bar)
        is_last = progress.step == schedule.max_steps or deadline.passed()
        if log is not None and is_due(schedule.logging_steps, progress.step, is_last):
            log(progress.step, out, meter, bar)
            meter.reset()
        with meter.paused():
            if evaluate is not None and is_due(schedule.eval_steps, progress.step, is_last):
                evaluate(progress.step, bar)
            if (
                checkpoint is not None
                and schedule.checkpointing_steps
                and is_due(schedule.checkpointing_steps, progress.step, is_last)
            ):
                checkpoint(progress.step)
        if is_last:
            break
    bar.close()
    return deadline.elapsed_seconds()
