"""The Transfusion attention mask: causal over the sequence, bidirectional inside each image."""

from __future__ import annotations

import torch


def image_segment_ids(image_mask: torch.Tensor, tokens_per_image: int) -> torch.Tensor:
    """Number every image in a batch; -1 marks text.

    Images are numbered in reading order over the flattened batch (row 0 first), the same order as
    the latents passed to the model. Counting patches rather than runs keeps two adjacent images
    apart even without a separator token.
    """
    flat = image_mask.reshape(-1)
    rank = torch.cumsum(flat.long(), 0) - 1
    ids = torch.where(flat, rank // tokens_per_image, torch.full_like(rank, -1))
    return ids.view_as(image_mask)


def transfusion_mask(
    segment_ids: torch.Tensor,
    key_padding: torch.Tensor | None = None,
    past_length: int = 0,
) -> torch.Tensor:
    """Boolean mask [B, 1, L, past_length + L] (True = may attend) for scaled_dot_product_attention.

    segment_ids: [B, L] image number per new position, -1 for text.
    key_padding: [B, past_length + L], 1 for real tokens, 0 for padding (None: no padding).
    Cached positions all precede the new ones, so every query may see every real cached key.
    """
    b, length = segment_ids.shape
    device = segment_ids.device
    pos = torch.arange(length, device=device)
    causal = pos[None, :] <= pos[:, None]  # [L, L]
    same_image = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] >= 0)
    new = causal[None] | same_image  # [B, L, L]
    past = torch.ones(b, length, past_length, dtype=torch.bool, device=device)
    mask = torch.cat([past, new], dim=-1)
    if key_padding is not None:
        mask = mask & key_padding.bool()[:, None, :]
        # A padded query that may see nothing would turn softmax into NaN; let it see itself.
        mask[:, pos, past_length + pos] = True
    return mask[:, None]
