"""Training checkpoints: accelerate's save_state written atomically, the newest one that loads found again, progress
counters.

Nothing is unpickled on resume: the model is safetensors, the progress counters JSON, and accelerate reads the
optimizer, scheduler, scaler and RNG files with `torch.load(weights_only=True)` (its default; only objects
registered with `register_for_checkpointing` would be unpickled, and none are).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
PROGRESS_FILE = "training_progress.json"


@dataclass
class TrainingProgress:
    """Counters that must survive a restart; saved as JSON beside accelerate's state."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    images_seen: int = 0
    skipped_rows: Counter = field(default_factory=Counter)
    skipped_steps: int = 0

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "images_seen": self.images_seen,
            "skipped_rows": dict(self.skipped_rows),
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.images_seen = int(state["images_seen"])
        self.skipped_rows = Counter(state["skipped_rows"])
        self.skipped_steps = int(state["skipped_steps"])


def checkpoint_steps(checkpoints_dir: Path) -> list[int]:
    if not checkpoints_dir.is_dir():
        return []
    return sorted(
        int(match.group(1)) for path in checkpoints_dir.iterdir() if (match := CHECKPOINT_PATTERN.match(path.name))
    )


class NoLoadableCheckpoint(RuntimeError):
    """--resume_from_checkpoint found no checkpoint that loads; the message names each one and why."""


def remove_partial_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Delete the temporary folders of checkpoint writes that were cut short; returns them."""
    partial = sorted(checkpoints_dir.glob(".tmp_step_*")) if checkpoints_dir.is_dir() else []
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def resume_checkpoint(accelerator, resume_from: str, checkpoints_dir: Path, progress: TrainingProgress) -> Path:
    """Load the checkpoint `resume_from` names into the prepared objects and `progress`, and return it.

    `latest`: the newest checkpoint under `checkpoints_dir` that loads; one that cannot be read (a truncated
    file, a missing part) is skipped with its reason printed, and the next older one tried. Anything else is one
    checkpoint folder, which must load."""
    if resume_from == "latest":
        candidates = [checkpoints_dir / f"step_{step}" for step in reversed(checkpoint_steps(checkpoints_dir))]
        if not candidates:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint in {checkpoints_dir}.")
    else:
        candidates = [Path(resume_from)]
        if not candidates[0].is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {resume_from}: no such checkpoint folder.")
    failures = []
    for checkpoint in candidates:
        try:
            load_checkpoint(accelerator, checkpoint, progress)
            return checkpoint
        except Exception as error:  # safetensors, torch and json each raise their own kind on a damaged file
            failures.append(f"{checkpoint}: {type(error).__name__}: {error}")
            logger.warning(f"Skipping checkpoint {failures[-1]}")
    raise NoLoadableCheckpoint("No checkpoint could be loaded:\n" + "\n".join(failures))


def save_checkpoint(accelerator, checkpoints_dir: Path, progress: TrainingProgress, keep: int) -> Path:
    """`accelerator.save_state` and the progress counters into a temporary folder, then rename it into place, so a
    kill during the write leaves the previous checkpoints intact; keeps the newest `keep` checkpoints (0 = all)."""
    step = progress.step
    final = checkpoints_dir / f"step_{step}"
    temporary = checkpoints_dir / f".tmp_step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temporary), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (temporary / PROGRESS_FILE).write_text(json.dumps(progress.state_dict(), indent=2) + "\n")
    except OSError:  # a full disk, say: no partial folder stays behind, the earlier checkpoints are whole
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        if keep > 0:
            for old_step in checkpoint_steps(checkpoints_dir)[:-keep]:
                shutil.rmtree(checkpoints_dir / f"step_{old_step}", ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path, progress: TrainingProgress) -> None:
    """Restore the prepared model, optimizer, scheduler, scaler and RNG states, and `progress`, from `checkpoint`."""
    accelerator.load_state(str(checkpoint))
    progress.load_state_dict(json.loads((checkpoint / PROGRESS_FILE).read_text()))
