"""Shared pieces of the benchmarks: median timing after warm-up, activation-memory accounting, output."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `run()` over `repeats` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        run()
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def saved_activation_bytes(run: Callable[[], torch.Tensor]) -> int:
    """Peak bytes of tensors autograd keeps for the backward pass while `run()` builds its graph, then backward.

    On CPU there is no allocator statistic; the tensors saved for backward are what grows with batch and grid, so
    their total is the activation memory a training step needs (parameters and inputs excluded).
    """
    alive: dict[int, int] = {}
    peak = 0

    def pack(tensor: torch.Tensor):
        nonlocal peak
        key = id(tensor) if tensor.untyped_storage() is None else tensor.untyped_storage().data_ptr()
        alive[key] = tensor.untyped_storage().nbytes()
        peak = max(peak, sum(alive.values()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = run()
    loss.backward()
    return peak


def print_table(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(row[column])) for row in rows) for column in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def print_json(results: dict) -> None:
    """The last line of every benchmark: its ratios as JSON (floats to 4 significant digits)."""
    print(
        json.dumps(
            {key: float(f"{value:.4g}") if isinstance(value, float) else value for key, value in results.items()}
        )
    )
