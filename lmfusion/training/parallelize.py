"""Per-layer wrappers, applied in torchtitan's order: activation checkpointing, compile, then FSDP.

Each entry of `model.layers` is one FusionDecoderLayer (text layer + image copy). Checkpointing
wraps it first (LMFusionModel.enable_gradient_checkpointing, at build time), `torch.compile`
then compiles that wrapped layer as one unit, and FSDP2's `fully_shard` (lmfusion.training.
distributed.wrap_model) shards the compiled module last, so its all-gathers stay outside the
compiled graph.
"""

from __future__ import annotations

import torch


def compile_layers(model) -> None:
    """torch.compile every fused decoder layer in place (idempotent).

    Text and image row counts change from batch to batch (they follow the captions), so the
    compiler is left to mark those sizes dynamic after the first recompile rather than
    specialising on every count; packing (pack_length) fixes the sequence length itself.
    """
    for index, layer in enumerate(model.layers):
        if not isinstance(layer, torch._dynamo.eval_frame.OptimizedModule):
            model.layers[index] = torch.compile(layer)
