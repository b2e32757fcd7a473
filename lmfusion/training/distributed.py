"""Data-parallel training under torchrun (gloo on CPU, nccl on GPU): DDP or FSDP2.

`parallel: ddp` replicates the model: every rank holds all parameters, gradients and AdamW
state, and only rank 0 writes checkpoints. Cheap and simple for SmolLM2-135M (110M trainable
parameters, ~1.8 GB of fp32 weights + grads + AdamW state).

`parallel: fsdp` shards it with FSDP2 (`torch.distributed.fsdp.fully_shard`): one unit per
FusionDecoderLayer (the text layer and its image copy, whose forward() is where FSDP gathers
them), then the root for the embeddings, final norms and U-Net blocks. Frozen text weights are
sharded too; they have no gradients and no optimizer state. Each rank holds 1/world of every
parameter, gradient and AdamW moment, which is what a Llama-3-8B base (16B parameters, 8B
trained) needs. Checkpoints become collective (torch.distributed.checkpoint, one shard file per
rank) plus a gathered single-file adapter for from_pretrained (training/checkpoint.py).

The fused layers reach the text layers a second way (text_model.get_decoder().layers), so the root unit
is told to ignore the parameters the layer units already own.

Gradient semantics: the loop builds each rank's loss as (sum over its tokens) / (GLOBAL count),
so the gradients must be SUMMED over ranks. DDP and FSDP both average, so the loop multiplies the
loss by world_size before backward (an exact power-of-two scale for 2, 4, 8 ranks).
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



def wrap_model(model: nn.Module, info: DistInfo, find_unused: bool = False, parallel: str = "ddp") -> nn.Module:
    """DDP around the model, or the model sharded in place by FSDP2, when there are several
    ranks; the bare model otherwise.

    find_unused: a micro-batch of only text-only examples leaves every image module without a
    gradient, which DDP must be told to expect (costs a graph traversal per step, so only then).
    """
    if not info.enabled:
        return model
    if parallel == "fsdp":
        return shard_model(model)
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.local_rank] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2: fully_shard each fused layer, then the root (in place; returns the same model)."""
    from torch.distributed.fsdp import fully_shard

    owned = set()
    for layer in model.layers:
        fully_shard(layer)
        owned.update(layer.parameters())
    fully_shard(model, ignored_params=owned)
    return model


def broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (running statistics), as DDP does before each forward.

    FSDP leaves buffers unsharded and per rank; without this, each rank's running statistics
    follow only its own micro-batches, and a sharded checkpoint (which stores one copy of a
    replicated tensor) could not resume them exactly.
    """
    if info.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_sync(wrapped: nn.Module, skip: bool):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) for all but the last
    accumulation micro-batch."""
    if skip and hasattr(wrapped, "no_sync"):
        with wrapped.no_sync():
            yield
    elif skip and hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> float:
    """clip_grad_norm_ that also works on FSDP's sharded (DTensor) gradients: the total norm is
    made whole over ranks before it scales anything."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = nn.utils.get_total_norm(grads, 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def local_numel(tensors) -> int:
    """Elements this rank stores of `tensors` (a DTensor counts only its local shard)."""
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() for t in tensors)


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
