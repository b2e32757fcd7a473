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
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask [B, 1, L, past_length + L] (True = may attend) for scaled_dot_product_attention.

    segment_ids: [B, L] image number per new position, -1 for text.
    key_padding: [B, past_length + L], 1 for real tokens, 0 for padding (None: no padding).
    document_ids: [B, L] example id per position in packed rows (None: one example per row); a
    query sees only keys of its own example. Packed rows carry no cache (training only).
    Cached positions all precede the new ones, so every query may see every real cached key.
    """
    b, length = segment_ids.shape
    device = segment_ids.device
    pos = torch.arange(length, device=device)
    causal = pos[None, :] <= pos[:, None]  # [L, L]
    same_image = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] >= 0)
    new = causal[None] | same_image  # [B, L, L]
    if document_ids is not None:
        new = new & (document_ids[:, :, None] == document_ids[:, None, :])
    past = torch.ones(b, length, past_length, dtype=torch.bool, device=device)
    mask = torch.cat([past, new], dim=-1)
    if key_padding is not None:
        mask = mask & key_padding.bool()[:, None, :]
        # A padded query that may see nothing would turn softmax into NaN; let it see itself.
        mask[:, pos, past_length + pos] = True
    return mask[:, None]


def transfusion_mask_mod(segment_ids: torch.Tensor, key_padding: torch.Tensor | None = None,
                         document_ids: torch.Tensor | None = None):
    """The same rule as transfusion_mask, as a flex_attention mask_mod(b, h, q, kv) (no cache).

    Padding keys are hidden; a padding query sees itself only, as in the dense mask, so its
    (unused) output stays finite.
    """
    def mask_mod(b, h, q, kv):
        allowed = (q >= kv) | ((segment_ids[b, q] == segment_ids[b, kv]) & (segment_ids[b, q] >= 0))
        if document_ids is not None:
            allowed = allowed & (document_ids[b, q] == document_ids[b, kv])
        if key_padding is not None:
            allowed = (allowed & (key_padding[b, kv] > 0)) | (q == kv)
        return allowed

    return mask_mod


def block_mask(segment_ids: torch.Tensor, key_padding: torch.Tensor | None = None,
               document_ids: torch.Tensor | None = None):
    """transfusion_mask_mod as a flex_attention BlockMask (built once per forward, shared by all layers).

    Block-sparse: blocks that no query may see are skipped, so separate documents of a packed row
    and the upper triangle cost nothing. The builder is compiled on a GPU, as torch recommends for
    long sequences; on a CPU it runs eagerly.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    batch, length = segment_ids.shape
    padding = None if key_padding is None else key_padding[:, -length:]
    return create_block_mask(transfusion_mask_mod(segment_ids, padding, document_ids), batch, None, length, length,
                             device=segment_ids.device, _compile=segment_ids.device.type == "cuda")
