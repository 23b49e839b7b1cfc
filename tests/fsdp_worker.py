"""Run by tests/test_distributed.py under torchrun: a few FSDP2 (fully_shard) SGD steps of MedMoE on this
rank's share of fixed global batches (benchmarks/fsdp2_sharding.py), then a save of the full weights.

Usage (from the repository root): torchrun --nproc_per_node N --module tests.fsdp_worker WORK_DIR
WORK_DIR holds config.json, weights.safetensors and batches.safetensors (STEPS global batches, keys KEY.STEP). Rank 0
writes losses.safetensors (the global loss of each step, mean over processes) and WORK_DIR/saved, a model folder
saved from the gathered full state dict.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from benchmarks.fsdp2_sharding import average_replicated_gradients, shard_with_fsdp2
from modeling_medmoe import MedMoEConfig, MedMoEModel


def main(work: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = MedMoEConfig.from_pretrained(work)
    model = MedMoEModel(config).eval()  # eval: no dropout, so runs are comparable
    model.load_state_dict(load_file(work / "weights.safetensors"))
    shard_with_fsdp2(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = load_file(work / "batches.safetensors")
    steps = len({key.split(".")[1] for key in batches})
    losses = []
    for step in range(steps):
        batch = {key.split(".")[0]: value for key, value in batches.items() if key.endswith(f".{step}")}
        share = batch["pixel_values"].shape[0] // world
        rows = slice(rank * share, (rank + 1) * share)
        out = model(**{key: value[rows] for key, value in batch.items()}, return_loss=True)
        out.loss.backward()
        average_replicated_gradients(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss / world)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_file({"losses": torch.stack(losses)}, work / "losses.safetensors")
        saved = MedMoEModel(config)
        saved.load_state_dict(full)
        saved.save_pretrained(work / "saved")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
