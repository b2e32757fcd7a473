"""Model FLOPs per training step and MFU (model FLOPs utilisation); the formula is in docs/mfu.md.

Unlike the measured counter (lmfusion.training.flops), which counts what autograd executes on
the padded batch, this is the *useful* work of a step, counted per token class:

* image tokens (trainable image layers): 6N (2N forward, 2N to the activations, 2N to the weights);
* text tokens with something trainable upstream, i.e. at or after the BOI of the first image of
  their document (the BOI embedding and the image K/V they attend to are trainable): 4N;
* text tokens with nothing trainable upstream (a caption before its image): 2N, forward only;
* padding: 0.

N is the per-token parameter count of the path the token takes (flops.path_parameters' text or
image path). The LM head adds (4 N_head + 2 N_head_trained) at scored positions, attention scores
add 2 f l h d c per token (f = 6, 4 or 2 by the token's class, l layers, h heads, head dim d,
c = tokens it attends to in its document, i.e. position + 1 under the causal mask, which
halves the full-context 12 l h d L), and the U-Net blocks 3x their forward FLOPs per image,
calibrated once per model with torch's FlopCounterMode on one latent.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..model.routing import frozen_context_mask

# bf16 dense tensor-core peak per device, from the vendors' data sheets (no sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}


def peak_flops(device: torch.device | str) -> float | None:
    """The bf16 peak of a known CUDA device, by name; None on a CPU or an unknown GPU (no MFU then)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # "H100 NVL" before "H100"
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def _numel(modules, trainable_only: bool = False) -> int:
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad or not trainable_only)


def path_parameters(model) -> dict[str, int]:
    """Per-token parameter counts of the text path, the image path and the LM head."""
    text_layers = list(model.decoder.layers)
    text = _numel(text_layers)
    if model.image_layers is None:  # dense: image tokens run through the text layers
        image_modules = text_layers
    elif all(layer.separate_attention for layer in model.image_layers):
        image_modules = list(model.image_layers)
    else:  # ffn_only: the shared (text) attention, then the image FFN
        image_modules = list(model.image_layers) + [t.self_attn for t in text_layers] + [t.input_layernorm for t in text_layers]
    head = model.text_model.get_output_embeddings().weight.numel() + model.special_head.weight.numel()
    return {
        "text": text,
        "text_trained": _numel(text_layers, trainable_only=True),
        "image": _numel(image_modules),
        "image_trained": _numel(image_modules, trainable_only=True),
        "head": head,
        "head_trained": _numel([model.text_model.get_output_embeddings()], True) + model.special_head.weight.numel(),
    }


def token_classes(batch, text_vocab_size: int) -> dict[str, torch.Tensor]:
    """Boolean [B, L] masks: image, text_upstream (4N), text_free (2N), padding; plus `context`.

    `context` [B, L] is how many tokens each position attends to in its document (causal). Batches
    that carry `document_ids` (packed rows) are split by them; otherwise a row is one document.
    """
    real = batch.attention_mask.bool()
    image = batch.image_mask & real
    docs = getattr(batch, "document_ids", None)
    if docs is None:
        docs = torch.zeros_like(batch.input_ids)
    starts = torch.ones_like(real)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    index = torch.arange(real.shape[1], device=real.device).expand_as(real)
    start_index = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    context = index - start_index + 1
    # Nothing trainable upstream: the model's own rule (BOI/EOI rows and image patches are the
    # trainable inputs), restarted at each document.
    free = frozen_context_mask(batch.input_ids, batch.image_mask, batch.attention_mask, text_vocab_size,
                               getattr(batch, "document_ids", None))
    text = real & ~image
    return {"image": image, "text_upstream": text & ~free, "text_free": text & free, "padding": ~real,
            "context": context}


def unet_forward_flops(model) -> float:
    """Forward FLOPs of the U-Net down and up blocks for one image, counted once and cached."""
    cached = getattr(model, "_unet_forward_flops", None)
    if cached is not None:
        return cached
    cfg = model.config
    blocks = (model.time_embed, model.image_in, model.image_out)
    modes = [b.training for b in blocks]
    device = next(model.image_in.parameters()).device
    try:
        for b in blocks:
            b.eval()  # BatchNorm readout: leave its running statistics alone
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            latents = torch.zeros(1, cfg.latent_channels, cfg.latent_size, cfg.latent_size, device=device)
            temb = model.time_embed(torch.zeros(1, dtype=torch.long, device=device), latents.dtype)
            tokens, skips = model.image_in(latents, temb)
            model.image_out(tokens.view(1, cfg.tokens_per_image, -1), skips, temb)
        flops = float(sum(count for op, count in counter.get_flop_counts()["Global"].items() if "convolution" in str(op)))
    finally:
        for b, mode in zip(blocks, modes):
            b.train(mode)
    model._unet_forward_flops = flops
    return flops


def step_flops(model, batch) -> dict[str, float]:
    """Model FLOPs of forward + backward of one MultimodalBatch, by part (see the module docstring)."""
    n = path_parameters(model)
    classes = token_classes(batch, model.text_vocab_size)
    counts = {k: int(classes[k].sum()) for k in ("image", "text_upstream", "text_free", "padding")}
    wants, _ = batch.text_targets()
    # A frozen path's backward to the weights is skipped: 2N per trained parameter only.
    layers = (4 * n["image"] + 2 * n["image_trained"]) * counts["image"]
    layers += (4 * n["text"] + 2 * n["text_trained"]) * counts["text_upstream"]
    layers += (2 * n["text"] + 4 * n["text_trained"]) * counts["text_free"]
    # The head at positions nothing trainable precedes runs forward only (LMFusionModel._selected_logits).
    scored_free = int((wants & classes["text_free"]).sum())
    head = (4 * n["head"] + 2 * n["head_trained"]) * (int(wants.sum()) - scored_free) + 2 * n["head"] * scored_free
    tc = model.text_config
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    factor = 6 * classes["image"].double() + 4 * classes["text_upstream"].double() + 2 * classes["text_free"].double()
    attention = 2 * tc.num_hidden_layers * heads * head_dim * float((factor * classes["context"]).sum())
    images = 0 if batch.latents is None else batch.latents.shape[0]
    unet = 3 * unet_forward_flops(model) * images
    total = float(layers + head) + attention + unet
    return {"total": total, "layers": float(layers), "head": float(head), "attention": attention, "unet": unet,
            **{f"tokens_{k}": float(v) for k, v in counts.items()}}
