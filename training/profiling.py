"""Where a training step's time goes: torch.profiler over a window of steps, each operator's time attributed to a
model component (forward and backward), a loss, the optimizer or the wait for data.

Forward time is attributed by ranges: `section(label)` in the training code, forward hooks on the components'
modules and the model's loss code (torch.profiler.record_function) open `medmoe::LABEL` ranges. Backward time is
attributed through autograd's sequence numbers: the backward of an operator carries the number of the forward
operator that made it, so it goes to that operator's component.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

RANGE_PREFIX = "medmoe::"
BACKWARD_PREFIX = "autograd::engine::evaluate_function"
OTHER = "other (autograd engine, accelerate, glue)"
# submodule path of MedMoEModel -> the component its time counts to
MODEL_COMPONENTS = {
    "vision_model.vision_pyramid": "Swin backbone (4-scale pyramid)",
    "vision_model.experts": "chosen experts (scale projections + per-location scale scorer)",
    "vision_model.image_router": "routers (image and text)",
    "text_router": "routers (image and text)",
    "text_tower": "text tower",
    "vision_model.image_projection": "projection heads",
    "region_projection": "projection heads",
    "text_projection": "projection heads",
    "word_projection": "projection heads",
}


def section(label: str) -> record_function:
    """A profiler range whose time counts to `label` (free when no profiler runs)."""
    return record_function(RANGE_PREFIX + label)


class _ModuleRanges:
    """Forward hooks that open a `section` when a module's forward starts and close it when it ends."""

    def __init__(self, model: torch.nn.Module, components: dict[str, str]):
        self.handles, self.open_ranges = [], []
        for path, label in components.items():
            module = model.get_submodule(path)
            self.handles.append(module.register_forward_pre_hook(lambda *_, label=label: self._enter(label)))
            self.handles.append(module.register_forward_hook(lambda *_: self._exit()))

    def _enter(self, label: str) -> None:
        self.open_ranges.append(section(label).__enter__())

    def _exit(self) -> None:
        self.open_ranges.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _innermost(event, predicate):
    while event is not None and not predicate(event):
        event = event.cpu_parent
    return event


def attribute(events) -> dict[str, dict[str, float]]:
    """Self CPU time (microseconds) of the profiled thread's operators by {label: {"forward"|"backward": time}}."""
    label_of_sequence = {}
    for event in events:
        if event.sequence_nr >= 0 and not event.name.startswith(BACKWARD_PREFIX):
            labelled = _innermost(event, lambda candidate: candidate.name.startswith(RANGE_PREFIX))
            if labelled is not None:
                label_of_sequence.setdefault(event.sequence_nr, labelled.name[len(RANGE_PREFIX) :])
    times = defaultdict(lambda: {"forward": 0.0, "backward": 0.0})
    for event in events:
        labelled = _innermost(event, lambda candidate: candidate.name.startswith((RANGE_PREFIX, BACKWARD_PREFIX)))
        if labelled is None:
            times[OTHER]["forward"] += event.self_cpu_time_total
        elif labelled.name.startswith(RANGE_PREFIX):
            times[labelled.name[len(RANGE_PREFIX) :]]["forward"] += event.self_cpu_time_total
        else:
            times[label_of_sequence.get(labelled.sequence_nr, OTHER)]["backward"] += event.self_cpu_time_total
    return dict(times)


WARMUP_STEPS = 5  # steps before the profiled window (the first steps pay for allocations and worker start-up)


class StepProfiler:
    """Profile training steps [first_step, first_step + steps) and write OUT/profile.md and OUT/profile.json.

    Call `step_begins(step)` before a step (counting from 0, the steps done so far) and `step_ended(step)` after it
    (the steps done now); the latter returns the table once, when the window has just ended. A window of 0 steps
    profiles nothing.
    """

    def __init__(self, model: torch.nn.Module, first_step: int, steps: int, output_dir: Path):
        self.model, self.first_step, self.steps, self.output_dir = model, first_step, steps, output_dir
        self.profiler = self.ranges = None

    def step_begins(self, step: int) -> None:
        if self.steps and step == self.first_step and self.profiler is None:
            self.ranges = _ModuleRanges(self.model, MODEL_COMPONENTS)
            self.profiler = profile(activities=[ProfilerActivity.CPU])
            self.profiler.__enter__()

    def step_ended(self, step: int) -> str | None:
        if self.profiler is None or step != self.first_step + self.steps:
            return None
        self.profiler.__exit__(None, None, None)
        self.ranges.remove()
        return self.write(attribute(self.profiler.events()))

    def write(self, times: dict[str, dict[str, float]]) -> str:
        """The per-step table (milliseconds and share of the step), written as markdown and JSON."""
        per_step = {
            label: {part: value / 1000 / self.steps for part, value in parts.items()} for label, parts in times.items()
        }
        total = sum(sum(parts.values()) for parts in per_step.values())
        lines = [
            f"Training step profile: steps {self.first_step + 1}-{self.first_step + self.steps}, "
            f"{total:.1f} ms per step (self CPU time of the training thread)",
            "",
            "| component | forward (ms) | backward (ms) | total (ms) | share |",
            "|---|---|---|---|---|",
        ]
        ranked = sorted(per_step.items(), key=lambda item: -sum(item[1].values()))
        for label, parts in ranked:
            both = parts["forward"] + parts["backward"]
            lines.append(
                f"| {label} | {parts['forward']:.1f} | {parts['backward']:.1f} | {both:.1f} | {both / total:.1%} |"
            )
        table = "\n".join(lines)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "profile.md").write_text(table + "\n")
        (self.output_dir / "profile.json").write_text(
            json.dumps({"steps": self.steps, "ms_per_step": total, "components": per_step}, indent=2)
        )
        return table
