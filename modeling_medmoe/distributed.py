# Copyright 2026 The MedMoE Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file except in compliance with
# the License. You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software distributed under the License is distributed on
# an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the
# specific language governing permissions and limitations under the License.
"""What MedMoE computes across processes: whether there are several, and the gathers and means over all of them."""

import torch
import torch.distributed as dist


def several_processes() -> bool:
    """Training runs in more than one process (torch.distributed is set up with a world larger than one)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate `tensor` [n, ...] from every process, keeping the gradient, and give this process's row offset.

    Without an initialised process group (one process) it returns the tensor itself and offset 0. All processes
    must pass the same shape.
    """
    if not several_processes():
        return tensor, 0
    gathered = torch.distributed.nn.functional.all_gather(tensor)
    return torch.cat(gathered), dist.get_rank() * tensor.shape[0]


def global_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The mean of `values[keep]` over ALL processes' rows, scaled so that the average over processes of what each
    returns is that global mean (gradients averaged by DDP are then the gradients of the global mean).

    values: [n] per-row losses; keep: [n] bool. Returns 0 (with a graph) when no process keeps a row.
    """
    kept_sum = values.masked_fill(~keep, 0.0).sum()
    count = keep.sum().to(values.dtype)
    scale = 1.0
    if several_processes():
        count = count.detach().clone()
        dist.all_reduce(count)
        scale = dist.get_world_size()
    return kept_sum * scale / count.clamp_min(1.0)
