"""Two processes (gloo, CPU) and one process on the same global batch give the same loss and gradients, under DDP
and under FSDP2."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from modeling_medmoe import MedMoEModel

ROOT = Path(__file__).resolve().parents[1]


def torchrun(worker: str, work: Path, port: int) -> None:
    """Run the module tests.WORKER on 2 CPU processes (gloo) with WORK as its argument."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "--module",
        f"tests.{worker}",
        str(work),
    ]
    completed = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert completed.returncode == 0, completed.stderr[-4000:]


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

    torchrun("distributed_worker", tmp_path, 29611)
    result = load_file(tmp_path / "result.safetensors")

    torch.testing.assert_close(result.pop("loss"), out.loss.detach(), atol=1e-5, rtol=1e-5)
    gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert set(gradients) <= set(result)
    idle = set(result) - set(gradients)  # experts no image chose: one process leaves them without a gradient,
    assert all(name.startswith("vision_model.experts.experts.") for name in idle)  # several hand them zeros
    assert all(not result[name].any() for name in idle)
    for name, gradient in gradients.items():
        torch.testing.assert_close(result[name], gradient, atol=1e-5, rtol=1e-4, msg=name)


def test_fsdp2_on_two_processes_matches_one_process_and_saves_full_weights(model, batch, tmp_path):
    """FSDP2 (benchmarks/fsdp2_sharding.py: the BERT layers and Swin blocks, as training/configs/fsdp.yaml), 3 SGD
    steps: the
    same losses as one process on the same global batches, and a saved model folder that reloads to the weights one
    process reached. The ranks route their halves to different experts, so some expert weights get no gradient on
    some ranks. SGD, not Adam, so that weights compare: Adam turns float noise in exactly-zero gradients (Swin's key
    bias) into full-size updates."""
    labels = torch.tensor([0, 1, 2, 3, 4, 5, -100, -100])
    steps = [{**batch, "report_type_labels": labels.roll(step)} for step in range(3)]
    for step, inputs in enumerate(steps):
        inputs["pixel_values"] = inputs["pixel_values"].roll(step, dims=0)
    model.config.save_pretrained(tmp_path)
    save_file(
        {name: tensor.contiguous() for name, tensor in model.state_dict().items()}, tmp_path / "weights.safetensors"
    )
    save_file(
        {f"{key}.{step}": value.clone() for step, inputs in enumerate(steps) for key, value in inputs.items()},
        tmp_path / "batches.safetensors",
    )

    model.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected_losses = []
    for inputs in steps:
        out = model(**inputs, return_loss=True)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        expected_losses.append(out.loss.detach())

    torchrun("fsdp_worker", tmp_path, 29612)
    torch.testing.assert_close(
        load_file(tmp_path / "losses.safetensors")["losses"], torch.stack(expected_losses), atol=1e-5, rtol=1e-5
    )
    reloaded = MedMoEModel.from_pretrained(tmp_path / "saved")
    expected = model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=1e-4, msg=name)
