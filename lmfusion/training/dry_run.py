"""`lmfusion train --dry-run`: what a run would hold per rank, before renting the GPUs.

The model is built on the meta device from the base model's config.json alone (no weights are
read, none are allocated), with the run's image side, so the parameter counts are exact. Memory
per rank is then estimated from them:

* weights: every parameter in fp32 (bf16 runs autocast; weights and AdamW state stay fp32);
* gradients: fp32, trainable parameters only;
* optimizer: AdamW's two fp32 moments per trainable parameter;
* activations: bf16 (or fp32) values kept for backward per token of one micro-batch. Without
  activation checkpointing a fused decoder layer keeps about 10 hidden-size vectors (norm
  inputs and outputs, Q/K/V, attention output, residuals) and 3 intermediate-size ones (SwiGLU's
  gate, up and product) per token; attention itself is a flash/flex kernel, which keeps no
  L x L matrix. With checkpointing only each layer's input is kept, plus one layer's full set
  while it is recomputed. This is an estimate, not a measurement: allocator slack, the
  U-Net's feature maps and the LM head's logits come on top.

DDP holds everything on every rank; FSDP shards weights, gradients and optimizer state over
the ranks (activations are per rank either way).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..base_models import check_supported, is_vlm_config, resolve_base_model
from .config import TrainConfig

# Latent shapes of codecs whose weights the dry run does not load: (channels, downsampling).
# sd-vae-ft-mse and other SD-family KL autoencoders: 4 channels, 8x downsampling.
KL_AUTOENCODER_DEFAULT = (4, 8)
# Mean example length in text tokens besides the image (caption, BOI, EOI, EOS) for token counts.
CAPTION_TOKENS = 32


def base_config(name_or_path: str):
    """The base model's transformers config (an LM's or a VLM's): a folder, a config.json path or a hub id (config only)."""
    from transformers import AutoConfig

    path = Path(name_or_path)
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_dir():
        return AutoConfig.from_pretrained(str(path))
    if name_or_path == "smollm2-135m":
        return AutoConfig.from_pretrained(resolve_base_model(name_or_path))
    try:
        from huggingface_hub import hf_hub_download

        return AutoConfig.from_pretrained(os.path.dirname(hf_hub_download(name_or_path, "config.json")))
    except Exception as error:  # offline, gated or a typo: one line naming what to do
        raise FileNotFoundError(f"cannot read the config.json of base model {name_or_path!r} ({type(error).__name__}); "
                                "pass --base-model a local folder or config.json path") from None


def latent_shape(codec: dict, image_size: int) -> tuple[int, int]:
    """(channels, side) of the codec's latents at image_size, without loading its weights."""
    from ..codecs.registry import CODEC_CLASSES

    cls = CODEC_CLASSES.get(codec.get("name"))
    channels, factor = getattr(cls, "latent_channels", None), getattr(cls, "downsample_factor", None)
    if channels is None or factor is None:  # a diffusers VAE: its config.json, else the SD-family default
        channels, factor = KL_AUTOENCODER_DEFAULT
        folder = Path(str(codec.get("path", "")), str(codec.get("subfolder") or ""))
        if (folder / "config.json").is_file():
            vae = json.loads((folder / "config.json").read_text())
            channels, factor = int(vae["latent_channels"]), 2 ** (len(vae["block_out_channels"]) - 1)
    return channels, image_size // factor


def meta_model(config: TrainConfig):
    """The run's LMFusionModel on the meta device: exact shapes, no storage, no weights read."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from ..config import LMFusionConfig
    from ..model.lmfusion import LMFusionModel

    base = base_config(config.base_model)
    check_supported(base, config.base_model)
    channels, side = latent_shape(config.codec, config.image_size)
    model_config = LMFusionConfig(base_model=config.base_model, mode=config.mode, attention=config.attention,
                                  codec=config.codec, image_size=config.image_size, latent_channels=channels,
                                  latent_size=side, patch_size=config.patch_size, **config.model)
    with torch.device("meta"):
        # A VLM builds whole (vision tower and projector count as frozen parameters).
        loader = AutoModelForImageTextToText if is_vlm_config(base) else AutoModelForCausalLM
        text_model = loader.from_config(base)
        return LMFusionModel(text_model, model_config, base_hash="dry-run (no weights read)")


@dataclass
class DryRun:
    parameters: int
    trainable: int
    unet: int
    image_layers: int
    tokens_per_example: int
    tokens_per_step: int
    tokens_per_micro_batch: int
    memory_gib: dict  # {"ddp" | "fsdp": {"weights", "gradients", "optimizer", "activations", "total"}}
    world_size: int


def dry_run(config: TrainConfig, world_size: int) -> DryRun:
    model = meta_model(config)
    text_config = model.text_config
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    unet = sum(p.numel() for name in ("time_embed", "image_in", "image_out") for p in getattr(model, name).parameters())
    image_layers = 0 if model.image_layers is None else sum(p.numel() for p in model.image_layers.parameters())
    per_example = model.config.tokens_per_image + CAPTION_TOKENS
    micro, _ = config.split_batch(world_size)
    micro_tokens = config.pack_length * -(-micro * per_example // config.pack_length) if config.pack_length else micro * per_example
    hidden, inter, layers = text_config.hidden_size, text_config.intermediate_size, text_config.num_hidden_layers
    act_bytes = 4 if config.precision == "fp32" else 2  # "auto" is bf16 on the GPUs this plans for
    per_layer_token = (10 * hidden + 3 * inter) * act_bytes
    if config.gradient_checkpointing:
        activations = micro_tokens * (layers * hidden * act_bytes + per_layer_token)
    else:
        activations = micro_tokens * layers * per_layer_token
    gib = 2**30
    memory = {}
    for parallel, shards in (("ddp", 1), ("fsdp", world_size)):
        parts = {"weights": 4 * total / shards / gib, "gradients": 4 * trainable / shards / gib,
                 "optimizer": 8 * trainable / shards / gib, "activations": activations / gib}
        parts["total"] = sum(parts.values())
        memory[parallel] = parts
    return DryRun(total, trainable, unet, image_layers, per_example, config.batch_size * per_example, micro_tokens,
                  memory, world_size)


def report(config: TrainConfig, result: DryRun) -> str:
    lines = [
        f"dry run: {config.name} on {result.world_size} rank(s); base {config.base_model} (config.json only, no weights)",
        f"parameters: {result.parameters / 1e9:.2f}B total, {result.trainable / 1e9:.2f}B trainable "
        f"(image layers {result.image_layers / 1e9:.2f}B, U-Net blocks + timestep MLP {result.unet / 1e9:.3f}B)",
        f"tokens: ~{result.tokens_per_example} per example ({result.tokens_per_example - CAPTION_TOKENS} image + "
        f"~{CAPTION_TOKENS} text), ~{result.tokens_per_step:,} per step, {result.tokens_per_micro_batch:,} per rank "
        f"and micro-batch" + (f" ({config.pack_length}-token packs)" if config.pack_length else ""),
        f"estimated memory per rank, GiB ({config.precision}, activation checkpointing "
        f"{'on' if config.gradient_checkpointing else 'off'}; see lmfusion/training/dry_run.py):",
        "  parallel  weights  gradients  optimizer  activations   total",
    ]
    for parallel, parts in result.memory_gib.items():
        lines.append(f"  {parallel:<8}{parts['weights']:>9.1f}{parts['gradients']:>11.1f}{parts['optimizer']:>11.1f}"
                     f"{parts['activations']:>13.1f}{parts['total']:>8.1f}")
    return "\n".join(lines)
