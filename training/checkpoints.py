"""Training checkpoints: accelerate's save_state written atomically, the latest one found again, progress counters."""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")


@dataclass
class TrainingProgress:
    """Counters that must survive a restart; registered with `accelerator.register_for_checkpointing`."""

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


def resolve_checkpoint(resume_from: str, checkpoints_dir: Path) -> Path:
    """`latest` -> the newest complete checkpoint under `checkpoints_dir`; anything else is a path."""
    if resume_from != "latest":
        path = Path(resume_from)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {resume_from}: no such checkpoint folder.")
        return path
    steps = checkpoint_steps(checkpoints_dir)
    if not steps:
        raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint in {checkpoints_dir}.")
    return checkpoints_dir / f"step_{steps[-1]}"


def save_checkpoint(accelerator, checkpoints_dir: Path, step: int, keep: int) -> Path:
    """`accelerator.save_state` into a temporary folder, then rename it into place, so a kill during the write
    leaves the previous checkpoints intact; keeps the newest `keep` checkpoints (0 = all)."""
    final = checkpoints_dir / f"step_{step}"
    temporary = checkpoints_dir / f".tmp_step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        if keep > 0:
            for old_step in checkpoint_steps(checkpoints_dir)[:-keep]:
                shutil.rmtree(checkpoints_dir / f"step_{old_step}", ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
