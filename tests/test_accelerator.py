"""CPU training under `accelerate launch` uses the machine's cores (training/accelerator.py), and the training
images/s leave held-out evaluation and checkpointing out (training/loop.py's ThroughputMeter)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from medmoe.training import accelerator as accelerator_module
from medmoe.training.accelerator import cpu_threads_per_process, use_idle_cores_on_cpu
from medmoe.training.loop import ThroughputMeter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """torch at 1 thread for the test, its thread count restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def launched_by_accelerate(monkeypatch, omp_threads: str) -> None:
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    monkeypatch.setenv("OMP_NUM_THREADS", omp_threads)


def test_the_one_thread_accelerate_launch_gives_becomes_the_cores(monkeypatch, one_thread, four_cores):
    launched_by_accelerate(monkeypatch, "1")
    lines = []
    assert use_idle_cores_on_cpu(lines.append) == 4
    assert torch.get_num_threads() == 4
    assert len(lines) == 1 and "4 threads" in lines[0] and "OMP_NUM_THREADS=1" in lines[0]


def test_the_cores_are_shared_by_the_processes_on_the_machine_and_limited_by_affinity(monkeypatch, four_cores):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_threads_per_process() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert cpu_threads_per_process() == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert cpu_threads_per_process() == 3


def test_a_plain_start_or_a_chosen_thread_count_is_left_alone(monkeypatch, one_thread, four_cores):
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert use_idle_cores_on_cpu() == 1 and torch.get_num_threads() == 1  # python/torchrun with OMP_NUM_THREADS=1
    launched_by_accelerate(monkeypatch, "3")
    torch.set_num_threads(3)
    assert use_idle_cores_on_cpu() == 3 and torch.get_num_threads() == 3  # --num_cpu_threads_per_process 3


def test_a_single_core_machine_stays_at_one_thread_without_a_message(monkeypatch, one_thread):
    launched_by_accelerate(monkeypatch, "1")
    monkeypatch.setattr(accelerator_module, "cpu_threads_per_process", lambda: 1)
    lines = []
    assert use_idle_cores_on_cpu(lines.append) == 1 and lines == []


def test_a_script_started_by_accelerate_launch_trains_with_the_cores(tmp_path):
    """The real launcher's environment: the script gets OMP_NUM_THREADS=1 and still trains on every core."""
    script = tmp_path / "threads.py"
    script.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from medmoe.training.accelerator import accelerator_for_this_machine\n"
        "accelerator_for_this_machine()\n"
        "print('OMP', os.environ['OMP_NUM_THREADS'], 'threads', torch.get_num_threads())\n"
    )
    environment = {
        key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
    }
    environment["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path on a machine with a GPU too
    completed = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"OMP 1 threads {cpu_threads_per_process()}" in completed.stdout


def test_images_per_second_leave_out_paused_time():
    meter = ThroughputMeter()
    meter.add(64, torch.zeros(64, dtype=torch.long))
    with meter.paused():
        time.sleep(0.5)
    assert meter.images_per_second() > 64 / 0.1  # the 0.5 s inside paused() is not training time
    assert meter.expert_counts[0] == 64
