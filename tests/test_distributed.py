"""Two processes (gloo, CPU) and one process on the same global batch give the same loss and gradients."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_match_one_process(model, batch, tmp_path):
    labels = torch.tensor([0, 1, 2, 3, 4, 5, -100, -100])
    inputs = {**{key: value for key, value in batch.items()}, "report_type_labels": labels}
    model.config.save_pretrained(tmp_path)
    save_file(
        {name: tensor.contiguous() for name, tensor in model.state_dict().items()}, tmp_path / "weights.safetensors"
    )
    save_file({key: value.contiguous() for key, value in inputs.items()}, tmp_path / "batch.safetensors")

    model.eval()
    out = model(**inputs, return_loss=True)
    out.loss.backward()

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29611",
        str(ROOT / "tests" / "distributed_worker.py"),
        str(tmp_path),
    ]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = load_file(tmp_path / "result.safetensors")

    torch.testing.assert_close(result.pop("loss"), out.loss.detach(), atol=1e-5, rtol=1e-5)
    gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert set(result) == set(gradients)
    for name, gradient in gradients.items():
        torch.testing.assert_close(result[name], gradient, atol=1e-5, rtol=1e-4, msg=name)
