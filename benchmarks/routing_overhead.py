"""Forward time of LMFusion on a mixed text+image batch vs the plain base LM on the same length.

Usage: python benchmarks/routing_overhead.py [--codec pixel|taef2 --batch 4 --length 256 --repeats 5 --threads 2]

Prints the ratio LMFusion / base, with and without the U-Net image in/out blocks (which the base
LM has no counterpart for), measured in one process, interleaving the runs so that machine noise
hits both sides alike. fp32, no grad.

Both image layouts give 64 tokens per image; they differ only in what the U-Net blocks see:
  pixel  64x64x3 pixels, patch 8: the U-Net convolves at 64x64 (the embedded default)
  taef2  8x8x32 TAEF2 latents, patch 1: the U-Net convolves at 8x8 (the paper's latent setting)
The latents are random: the codec's encoder is not part of the model's forward and is not timed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from lmfusion.base_models import load_text_model
from lmfusion.config import LMFusionConfig
from lmfusion.model.lmfusion import LMFusionModel


IMAGE_LAYOUTS = {
    "pixel": dict(codec={"name": "pixel"}, latent_channels=3, latent_size=64, patch_size=8),
    "taef2": dict(codec={"name": "taef2"}, latent_channels=32, latent_size=8, patch_size=1),
}


def mixed_batch(model: LMFusionModel, batch: int, length: int, vocab: int, images_per_row: int):
    n = model.config.tokens_per_image
    ids = torch.randint(0, vocab, (batch, length))
    image_mask = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(batch):
        # Spread the images out: text, BOI, patches, EOI, text, ...
        gap = (length - images_per_row * (n + 2)) // (images_per_row + 1)
        start = gap
        for _ in range(images_per_row):
            ids[row, start] = model.boi_token_id
            image_mask[row, start + 1 : start + 1 + n] = True
            ids[row, start + n + 1] = model.eoi_token_id
            start += n + 2 + gap
    size = model.config.latent_size
    latents = torch.randn(batch * images_per_row, model.config.latent_channels, size, size)
    timesteps = torch.randint(0, 1000, (batch * images_per_row,))
    return ids, image_mask, latents, timesteps


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--codec", choices=sorted(IMAGE_LAYOUTS), default="pixel")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--images-per-row", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base, _ = load_text_model(args.base_model)
    base.eval()
    model = LMFusionModel(base, LMFusionConfig(base_model=args.base_model, **IMAGE_LAYOUTS[args.codec])).eval()
    vocab = model.text_vocab_size
    ids, image_mask, latents, timesteps = mixed_batch(model, args.batch, args.length, vocab, args.images_per_row)
    text_ids = torch.randint(0, vocab, (args.batch, args.length))

    def run_base():
        base(text_ids)

    def run_mixed():
        model(ids, image_mask, latents, timesteps)

    # Bodies without the LM head: the base computes logits at every position, LMFusion only at
    # text positions, so the full-forward ratio flatters LMFusion on mixed input.
    no_logits = torch.zeros_like(image_mask)

    def run_base_body():
        base.model(text_ids)

    def run_mixed_body():
        model(ids, image_mask, latents, timesteps, logits_mask=no_logits)

    def run_unet():
        temb = model.time_embed(timesteps, latents.dtype)
        tokens, skips = model.image_in(latents, temb)
        model.image_out(tokens, skips, temb)

    def run_text_only():
        model(text_ids)

    runs = {
        "base": run_base,
        "lmfusion_mixed": run_mixed,
        "lmfusion_text_only": run_text_only,
        "base_body": run_base_body,
        "lmfusion_mixed_body": run_mixed_body,
        "unet_blocks": run_unet,
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in runs.items():
                times[name].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    n_image_tokens = int(image_mask.sum())
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(f"batch {args.batch} x {args.length} tokens; mixed: {n_image_tokens} image tokens "
          f"({latents.shape[0]} images of {model.config.tokens_per_image}, {args.codec} layout), fp32, median of {args.repeats}")
    for name, value in med.items():
        print(f"  {name:<20} {value * 1000:8.1f} ms")
    print(f"ratio lmfusion_mixed / base                 {med['lmfusion_mixed'] / med['base']:.3f}")
    print(f"ratio (lmfusion_mixed - unet_blocks) / base {(med['lmfusion_mixed'] - med['unet_blocks']) / med['base']:.3f}")
    print(f"ratio lmfusion_text_only / base             {med['lmfusion_text_only'] / med['base']:.3f}")
    print(f"ratio lmfusion_mixed_body / base_body       {med['lmfusion_mixed_body'] / med['base_body']:.3f}")
    body_no_unet = med["lmfusion_mixed_body"] - med["unet_blocks"]
    print(f"ratio (mixed_body - unet_blocks) / base_body {body_no_unet / med['base_body']:.3f}")


if __name__ == "__main__":
    main()
