"""FusionDecoderLayer: one fused decoder layer, the base model's text layer plus its image copy.

Its forward() takes both residual streams and returns both, so everything a layer computes
happens inside one module call. That is the boundary per-layer wrappers need: FSDP2
(`fully_shard` gathers a module's parameters in hooks around its forward) and activation
checkpointing (`checkpoint_wrapper`).

The text half runs the base layer's own submodules with the same operations as the HF layer,
so text-only logits stay bit-identical to the base model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .routing import ImageLayer, Routing, feed_forward, project_qkv


class FusionDecoderLayer(nn.Module):
    """Decoder layer `index`: `text` is the base model's own layer object (shared, not a copy);
    `image` is its image copy (None in dense mode, where image rows use the text weights)."""

    def __init__(self, text: nn.Module, image: ImageLayer | None, index: int):
        super().__init__()
        self.text = text
        self.image = image
        self.index = index  # the layer's slot in the KV cache

    def forward(self, x_text: torch.Tensor, x_image: torch.Tensor | None, routing: Routing, rotary, mask, cache):
        text, image = self.text, self.image
        attn = text.self_attn
        # Which modules the image rows use: their own copy where one exists, else the shared text one.
        image_attn = image if image is not None and image.separate_attention else attn
        image_attn_norm = image.input_layernorm if image_attn is image else text.input_layernorm
        image_ffn = image if image is not None else text

        q, k, v = routing.frozen_context(lambda x: project_qkv(text.input_layernorm, attn, x), x_text)
        if x_image is not None:
            qi, ki, vi = project_qkv(image_attn_norm, image_attn, x_image)
            q, k, v = routing.merge(q, qi), routing.merge(k, ki), routing.merge(v, vi)

        shape = (routing.batch, routing.length, -1, attn.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary_pos_emb(q, k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v, self.index)
        if isinstance(mask, BlockMask):
            out = flex_attention_kernel(q.device)(q, k, v, block_mask=mask, scale=attn.scaling,
                                                  enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)
        else:
            out, _ = sdpa_attention_forward(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
        out_text, out_image = routing.split(out.reshape(routing.batch * routing.length, -1))

        x_text = routing.frozen_context(
            lambda x, o: feed_forward(x + attn.o_proj(o), text.post_attention_layernorm, text.mlp), x_text, out_text)
        if x_image is not None:
            x_image = x_image + image_attn.o_proj(out_image)
            x_image = feed_forward(x_image, image_ffn.post_attention_layernorm, image_ffn.mlp)
        return x_text, x_image


_COMPILED_FLEX = None


def flex_attention_kernel(device: torch.device):
    """torch's flex_attention: compiled on a GPU (its fused kernel; eager there is a slow reference),
    eager on a CPU, where torch has a forward but no backward for it."""
    global _COMPILED_FLEX
    if device.type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def checkpoint_when_training(module: nn.Module, *args, **kwargs):
    """Activation checkpointing only where it saves memory: a training forward that builds a graph
    (evaluation and sampling under no_grad run the layer plainly, with the KV cache)."""
    if module.training and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False, **kwargs)
    return module(*args, **kwargs)


def wrap_checkpointing(layer: nn.Module) -> nn.Module:
    """`layer` inside torch's checkpoint_wrapper (idempotent), as FSDP/torchtitan stacks expect."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper

    if isinstance(layer, CheckpointWrapper):
        return layer
    return checkpoint_wrapper(layer, checkpoint_fn=checkpoint_when_training)


def unwrap_checkpointing(layer: nn.Module) -> nn.Module:
    """The FusionDecoderLayer inside torch.compile's and checkpoint_wrapper's wrappers, if any."""
    layer = getattr(layer, "_orig_mod", layer)
    return getattr(layer, "_checkpoint_wrapped_module", layer)
