"""Modality routing: every token goes through its own modality's weights, attention is shared.

The residual stream is kept split in two flat tensors, text rows and image rows, so each
modality's norms, projections and FFN run as one dense matmul over exactly its own tokens
(no token pays for both). Only attention needs sequence order: Q/K/V are written back into
[B*L] order (one index_copy per modality), and the attention output is split again (one gather).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Routing:
    """Where the text and image rows of a [B, L] batch live in the flattened sequence."""

    batch: int
    length: int
    text_index: torch.Tensor  # [N_text] positions in the flattened B*L sequence
    image_index: torch.Tensor  # [N_image]
    has_images: bool

    @classmethod
    def from_mask(cls, image_mask: torch.Tensor | None, batch: int, length: int, device) -> "Routing":
        if image_mask is None or not bool(image_mask.any()):
            empty = torch.empty(0, dtype=torch.long, device=device)
            return cls(batch, length, torch.arange(batch * length, device=device), empty, False)
        flat = image_mask.reshape(-1)
        return cls(batch, length, torch.nonzero(~flat).squeeze(1), torch.nonzero(flat).squeeze(1), True)

    def split(self, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B*L, ...] in sequence order -> (text rows, image rows)."""
        if not self.has_images:
            return full, None
        return full.index_select(0, self.text_index), full.index_select(0, self.image_index)

    def merge(self, text: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        """(text rows, image rows) -> [B*L, ...] in sequence order."""
        if not self.has_images:
            return text
        # Two index_copy_ writes into one buffer: a single pass over each row, no concatenation.
        out = text.new_empty((self.batch * self.length, *text.shape[1:]))
        out.index_copy_(0, self.text_index, text)
        out.index_copy_(0, self.image_index, image.to(text.dtype))
        return out


class ImageLayer(nn.Module):
    """The image copy of one decoder layer.

    With `separate_attention` it holds its own input norm, Q/K/V and O (LMFusion, "deep
    separation"); without, only the FFN and its norm ("shallow separation") and attention is
    shared with the text layer. Copies start from the text weights, or re-initialised.
    """

    def __init__(self, text_layer: nn.Module, separate_attention: bool, random_init: bool, init_std: float):
        super().__init__()
        attn = text_layer.self_attn
        self.separate_attention = separate_attention
        if separate_attention:
            self.input_layernorm = copy.deepcopy(text_layer.input_layernorm)
            self.q_proj = copy.deepcopy(attn.q_proj)
            self.k_proj = copy.deepcopy(attn.k_proj)
            self.v_proj = copy.deepcopy(attn.v_proj)
            self.o_proj = copy.deepcopy(attn.o_proj)
        self.post_attention_layernorm = copy.deepcopy(text_layer.post_attention_layernorm)
        self.mlp = copy.deepcopy(text_layer.mlp)
        self.requires_grad_(True)
        if random_init:
            reinitialize(self, init_std)


@torch.no_grad()
def reinitialize(module: nn.Module, std: float) -> None:
    """Fresh init in the style of HF Llama: N(0, std) weights, zero biases, unit norm gains."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            sub.weight.normal_(0.0, std)
            if getattr(sub, "bias", None) is not None:
                sub.bias.zero_()
        elif hasattr(sub, "variance_epsilon") and hasattr(sub, "weight"):  # Llama/Qwen RMSNorm
            sub.weight.fill_(1.0)


def project_qkv(norm: nn.Module, proj: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h = norm(x)
    return proj.q_proj(h), proj.k_proj(h), proj.v_proj(h)


def feed_forward(x: torch.Tensor, norm: nn.Module, mlp: nn.Module) -> torch.Tensor:
    return x + mlp(norm(x))
