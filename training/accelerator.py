"""The Accelerator every training script builds: on the GPU when there is one, otherwise on the CPU with its cores.

`accelerate launch` hands each process `OMP_NUM_THREADS=1` unless the user set that variable or passed
`--num_cpu_threads_per_process` (its own CPU tuning applies only with `--cpu` and an explicit process count). That is
its default for GPU runs; on a machine without a GPU it leaves cores idle. When a script trains on the CPU under
that default, each process gets physical cores / processes on this machine threads instead, the rule accelerate
applies to its `--cpu` runs. A plain `python` or `torchrun` start is left as it is.
"""

from __future__ import annotations

import os

import psutil
import torch
from accelerate import Accelerator


def accelerator_for_this_machine(**accelerator_options) -> Accelerator:
    """`Accelerator(**accelerator_options)` on the GPU if there is one, else on the CPU with
    `use_idle_cores_on_cpu`."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), **accelerator_options)
    if accelerator.device.type == "cpu":
        use_idle_cores_on_cpu(accelerator.print)
    return accelerator


def use_idle_cores_on_cpu(report=print) -> int:
    """Raise torch's thread count from the 1 that `accelerate launch` set by default to
    `cpu_threads_per_process()`; returns the thread count in use."""
    launched_by_accelerate = "ACCELERATE_DYNAMO_BACKEND" in os.environ
    if not launched_by_accelerate or os.environ.get("OMP_NUM_THREADS") != "1" or torch.get_num_threads() != 1:
        return torch.get_num_threads()
    threads = cpu_threads_per_process()
    if threads > 1:
        torch.set_num_threads(threads)
        report(
            f"training on the CPU with {threads} threads per process (`accelerate launch` had set OMP_NUM_THREADS=1, "
            "its default for GPU runs)"
        )
    return threads


def cpu_threads_per_process() -> int:
    """Physical cores this process may run on, shared among the processes on this machine (LOCAL_WORLD_SIZE)."""
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        cores = min(cores, len(os.sched_getaffinity(0)))
    return max(cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
