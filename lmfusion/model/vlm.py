"""A VLM's own understanding path, rerun exactly inside LMFusion (the paper's LLaVAFusion, §5.3).

When the base model is a LLaVA-family VLM, the images it *reads* stay its business: their pixels go
through its own vision tower and projector (`get_image_features`, with the family's anyres packing
for LLaVA-NeXT / OneVision), and the features replace the embeddings at its `<image>` placeholder
tokens with the same `masked_scatter` its forward uses. Those positions are then ordinary frozen
text rows for LMFusion's routing, so with the VLM frozen its logits are unchanged, bit for bit.
Images LMFusion *generates* are a different token type (latent patches through the image modules).
"""

from __future__ import annotations

import torch
from torch import nn


def is_vlm(model: nn.Module) -> bool:
    return getattr(model.config, "vision_config", None) is not None


def image_token_id(model: nn.Module) -> int:
    return int(model.config.image_token_id)


def understanding_features(vlm: nn.Module, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None,
                           **vision_kwargs) -> torch.Tensor:
    """[N_placeholders, hidden]: the VLM's projected image features, in reading order.

    Exactly what the VLM's forward scatters into its embeddings: its `get_image_features`, with the
    vision feature layer and selection strategy taken from its config as its forward does.
    """
    inner = vlm.model
    if image_sizes is not None:
        vision_kwargs["image_sizes"] = image_sizes
    elif vlm.config.model_type != "llava":
        raise ValueError(f"a {vlm.config.model_type} VLM needs image_sizes with pixel_values (its processor returns them)")
    out = inner.get_image_features(pixel_values=pixel_values, return_dict=True, **vision_kwargs)
    return torch.cat(list(out.pooler_output), dim=0)


def merge_understanding_images(vlm: nn.Module, input_ids: torch.Tensor, embeds: torch.Tensor,
                               pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None,
                               **vision_kwargs) -> torch.Tensor:
    """`embeds` [B, L, H] with the VLM's image features at its `<image>` placeholders (as its forward)."""
    features = understanding_features(vlm, pixel_values, image_sizes, **vision_kwargs)
    features = features.to(embeds.device, embeds.dtype)
    placeholders = input_ids == image_token_id(vlm)
    if int(placeholders.sum()) * embeds.shape[-1] != features.numel():
        raise ValueError(f"the prompt has {int(placeholders.sum())} image placeholder tokens but the images give "
                         f"{features.shape[0]} features: build the prompt with the VLM's processor")
    return embeds.masked_scatter(placeholders.unsqueeze(-1), features)
