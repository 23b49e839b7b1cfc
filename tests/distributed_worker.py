"""Run by tests/test_distributed.py under torchrun: one DDP step of MedMoE on this rank's share of a fixed batch.

Usage (from the repository root): torchrun --nproc_per_node N --module tests.distributed_worker WORK_DIR
WORK_DIR holds config.json, weights.safetensors and batch.safetensors; rank 0 writes result.safetensors with the
global loss (mean over processes) and the DDP-averaged gradients.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from modeling_medmoe import MedMoEConfig, MedMoEModel


def main(work: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = MedMoEModel(MedMoEConfig.from_pretrained(work)).eval()  # eval: no dropout, so runs are comparable
    model.load_state_dict(load_file(work / "weights.safetensors"))
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    batch = load_file(work / "batch.safetensors")
    share = batch["pixel_values"].shape[0] // world
    rows = slice(rank * share, (rank + 1) * share)
    out = ddp(**{key: value[rows] for key, value in batch.items()}, return_loss=True)
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    if rank == 0:
        gradients = {name: p.grad.contiguous() for name, p in model.named_parameters() if p.grad is not None}
        save_file({"loss": loss / world, **gradients}, work / "result.safetensors")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
