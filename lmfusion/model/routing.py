"""Modality routing: every token goes through its own modality's weights, attention is shared.

The residual stream is kept split in two flat tensors, text rows and image rows, so each
modality's norms, projections and FFN run as one dense matmul over exactly its own tokens
(no token pays for both). Only attention needs sequence order: Q/K/V are written back into
[B*L] order (one index_copy per modality), and the attention output is split again (one gather).

In training, the text rows that nothing trainable precedes in their document (a caption before
its image, padding) are *frozen context*: their hidden states are constants of the frozen base
model, so they are computed without an autograd graph. They lead the text stream (its first
`n_context` rows), and `frozen_context` runs any text-side function on them under no_grad:
backward then skips their frozen matmuls entirely instead of carrying gradients nobody uses.
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
    text_index: torch.Tensor  # [N_text] positions in the flattened B*L sequence, frozen context first
    image_index: torch.Tensor  # [N_image]
    has_images: bool
    n_context: int = 0  # leading text rows with nothing trainable upstream (computed without a graph)

    @classmethod
    def from_mask(cls, image_mask: torch.Tensor | None, batch: int, length: int, device,
                  context_mask: torch.Tensor | None = None) -> "Routing":
        """`context_mask` [B, L]: text positions to run as frozen context (None: none)."""
        if image_mask is None or not bool(image_mask.any()):
            empty = torch.empty(0, dtype=torch.long, device=device)
            return cls(batch, length, torch.arange(batch * length, device=device), empty, False)
        flat = image_mask.reshape(-1)
        image_index = torch.nonzero(flat).squeeze(1)
        if context_mask is None:
            return cls(batch, length, torch.nonzero(~flat).squeeze(1), image_index, True)
        context = context_mask.reshape(-1) & ~flat
        context_index = torch.nonzero(context).squeeze(1)
        live_index = torch.nonzero(~flat & ~context).squeeze(1)
        return cls(batch, length, torch.cat([context_index, live_index]), image_index, True, context_index.numel())

    def frozen_context(self, fn, x: torch.Tensor, *rest: torch.Tensor):
        """fn(x, *rest) over the text stream, its first n_context rows without an autograd graph.

        `rest` are further row-aligned inputs (e.g. a residual); fn may return a tensor or a tuple.
        """
        n = self.n_context
        if n == 0:
            return fn(x, *rest)
        with torch.no_grad():  # detached: a no-grad view of a graph tensor confuses module hooks
            head = fn(x[:n].detach(), *(r[:n].detach() for r in rest))
        tail = fn(x[n:], *(r[n:] for r in rest))
        if isinstance(tail, tuple):
            return tuple(torch.cat([h, t]) for h, t in zip(head, tail))
        return torch.cat([head, tail])

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


def frozen_context_mask(input_ids: torch.Tensor, image_mask: torch.Tensor | None, attention_mask: torch.Tensor | None,
                        text_vocab_size: int, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L] True at positions whose hidden state no trainable parameter can reach.

    With the text modules frozen, the only trainable inputs of the stack are image patches and the
    BOI/EOI embedding rows. A position is reachable from them iff one of them sits at or before it
    in the same document (attention is causal across documents' text); everything earlier, and
    padding, is a constant of the base model. Documents are rows unless `document_ids` says otherwise.
    """
    trainable = input_ids >= text_vocab_size
    if image_mask is not None:
        trainable = trainable | image_mask
    count = trainable.long().cumsum(-1)
    if document_ids is not None:  # restart the count at each document's first position
        starts = torch.ones_like(trainable)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        before = torch.where(starts, count - trainable.long(), torch.zeros_like(count))
        count = count - before.cummax(-1).values
    context = count == 0
    if attention_mask is not None:
        context = context | ~attention_mask[:, -input_ids.shape[1]:].bool()
    return context
