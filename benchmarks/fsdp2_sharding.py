"""FSDP2 for MedMoE under torchrun: `fully_shard` on the transformer blocks of both towers, then on the whole model.

    torchrun --nproc_per_node N your_script.py
    # in it: shard_with_fsdp2(model) before building the optimizer, and after each backward pass (before the
    # optimizer step) average_replicated_gradients(model)

Sharding units are those of training/configs/fsdp.yaml (BERT layers and Swin blocks); the experts are small and stay
with the root. FSDP2 cannot shard a 0-dimensional parameter ("fully_shard doesn't support scalar parameters"), and
MedMoE's logit scale is one (as CLIP's is), so it stays replicated, and `average_replicated_gradients` averages its
gradient over the processes (after the backward pass: a collective inside it could run in a different order on
each process than FSDP's own). Each process may route its images to different experts; experts without a gradient on
a process take part in the reduction with zeros.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

SHARDED_BLOCKS = ("BertLayer", "SwinTransformerBlock")


def shard_with_fsdp2(model: torch.nn.Module) -> torch.nn.Module:
    """Apply FSDP2 to `model` in place (a process group must be initialised) and return it."""
    scalars = {parameter for parameter in model.parameters() if parameter.ndim == 0}
    for module in model.modules():
        if type(module).__name__ in SHARDED_BLOCKS:
            fully_shard(module)
    fully_shard(model, ignored_params=scalars)
    return model


def average_replicated_gradients(model: torch.nn.Module) -> None:
    """Average the gradients of the parameters FSDP2 left replicated (the 0-dimensional ones) over the processes."""
    for parameter in model.parameters():
        if parameter.ndim == 0:
            gradient = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
            dist.all_reduce(gradient)  # gloo has no average: sum, then divide
            parameter.grad = gradient.div_(dist.get_world_size())
