"""Data-parallel training under torchrun (gloo on CPU, nccl on GPU).

Why DDP and not FSDP2 (`torch.distributed.fsdp.fully_shard`): FSDP2 gathers a module's sharded
parameters in a hook around that module's forward(). LMFusionModel routes tokens by calling the
*submodules* of each decoder layer directly (`layer.self_attn.q_proj`, `image_layer.mlp`, ...),
never `layer.forward()`, so per-layer `fully_shard` units would hand those calls sharded
DTensors. The only unit that works is the whole model, which gathers every parameter at once and
so saves nothing during forward/backward while making checkpoints collective (full-state-dict
gathers). fully_shard itself does run on CPU/gloo in torch 2.13 (checked on a toy model); with
a per-layer module boundary in the model (a FusionLayer whose forward() takes both streams) it
would become the right choice for 8B-scale bases. For SmolLM2-135M (110M trainable parameters,
~1.8 GB of fp32 weights + grads + AdamW state) replicating is cheap, and DDP keeps checkpoints
plain: every rank holds the full state and only rank 0 writes.

Gradient semantics: the loop builds each rank's loss as (sum over its tokens) / (GLOBAL count),
so the gradients must be SUMMED over ranks. DDP averages, so the loop multiplies the loss by
world_size before backward (an exact power-of-two scale for 2, 4, 8 ranks).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device("cpu" if device == "auto" else device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=60),
            device_id=chosen if use_cuda else None,
        )
    return DistInfo(rank, world, local_rank, chosen)


def wrap_model(model: nn.Module, info: DistInfo, find_unused: bool = False) -> nn.Module:
    """DDP around the model when there are several ranks; the bare model otherwise.

    find_unused: a micro-batch of only text-only examples leaves every image module without a
    gradient, which DDP must be told to expect (costs a graph traversal per step, so only then).
    """
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.local_rank] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def no_sync(wrapped: nn.Module, skip: bool):
    """Skip the gradient all-reduce for all but the last accumulation micro-batch."""
    if skip and hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a small tensor over ranks (in float64, so counts and loss sums stay exact)."""
    values = values.detach().to(torch.float64)
    if info.enabled:
        values = values.to(info.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.cpu()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(value, info: DistInfo):
    """Rank 0's value on every rank (e.g. an error message or a decision)."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
