"""Inference speed: what the prefix cache and batched CFG buy, and text decoding vs the base LM.

    python benchmarks/sampling.py                  # SmolLM2-135M, 64 px pixel codec, 20 steps
    python benchmarks/sampling.py --steps 50 --repeats 3

Image weights are untrained (timing only). Every configuration samples the same images from the
same seed, and the script checks they agree, so the speed-ups are for identical outputs.
Timings are the best of several runs (--repeats, --text-repeats), alternating configurations so
that load from other processes on the machine hits all of them alike. Prints a Markdown report.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from lmfusion.config import LMFusionConfig
from lmfusion.diffusion import DEFAULT_GUIDANCE_SCALE
from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.sampling.image import sample_latents
from lmfusion.sampling.text import generate_text_ids

SHORT_PROMPT = "a small red circle above a large blue square on a white background"
LONG_PROMPT = " ".join([SHORT_PROMPT] * 12)  # ~170 tokens: where the prefix cache matters most
TEXT_PROMPT = "The three most important inventions of the nineteenth century were"

IMAGE_CONFIGS = {  # name -> sample_latents options
    "prefix cache + batched CFG (default)": dict(),
    "no prefix cache, batched CFG": dict(cache_prefix=False),
    "prefix cache, CFG as two passes": dict(batch_cfg=False),
}


def build_model(base: str) -> LMFusionModel:
    config = LMFusionConfig(base_model=base, codec={"name": "pixel"}, image_size=64, latent_size=64, patch_size=8)
    return LMFusionModel.from_text_model(base, config).eval()


def best_of(repeats: int, functions: dict) -> tuple[dict, dict, dict]:
    """Run every function `repeats` times, interleaved; best wall and CPU seconds, last results.

    CPU seconds (this process only) are the steadier number on a machine shared with other
    jobs: waiting for a core counts in wall time but not in CPU time.
    """
    wall = {name: float("inf") for name in functions}
    cpu = dict(wall)
    results = {}
    for _ in range(repeats):
        for name, fn in functions.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            results[name] = fn()
            wall[name] = min(wall[name], time.perf_counter() - start)
            cpu[name] = min(cpu[name], time.process_time() - start_cpu)
    return wall, cpu, results


def bench_images(model, prompt: str, args) -> list[str]:
    tokens = len(model.tokenizer(prompt, add_special_tokens=False).input_ids)
    options = dict(n=1, steps=args.steps, guidance_scale=args.guidance_scale, seed=0, progress=False)
    functions = {name: (lambda extra=extra: sample_latents(model, prompt, **options, **extra)) for name, extra in IMAGE_CONFIGS.items()}
    wall, cpu, results = best_of(args.repeats, functions)
    default = next(iter(IMAGE_CONFIGS))
    lines = [
        f"\nText-to-image, prompt of {tokens} tokens, {model.config.tokens_per_image} image tokens, "
        f"{args.steps} DDIM steps, guidance scale {args.guidance_scale}:\n",
        "| configuration | CPU s / image | vs default (CPU) | wall s / image | max abs diff vs default |",
        "|---|---|---|---|---|",
    ]
    for name in IMAGE_CONFIGS:
        diff = (results[name] - results[default]).abs().max().item()
        lines.append(
            f"| {name} | {cpu[name]:.2f} | {cpu[name] / cpu[default]:.2f}x | {wall[name]:.2f} | {diff:.1e} |"
        )
    return lines


def bench_text(model, args) -> list[str]:
    ids = model.tokenizer(TEXT_PROMPT).input_ids
    prompt = torch.tensor([ids])

    def base_generate():
        with torch.no_grad():
            out = model.text_model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False)
        return out[0, len(ids):].tolist()

    functions = {"base model generate": base_generate, "lmfusion generate_text": lambda: generate_text_ids(model, ids, args.max_new_tokens)}
    functions["base model generate"]()  # warm-up (first-call setup in transformers)
    wall, cpu, results = best_of(args.text_repeats, functions)
    base = "base model generate"
    same = results[base] == results["lmfusion generate_text"]
    count = len(results[base])
    lines = [
        f"\nGreedy text, prompt of {len(ids)} tokens, {count} new tokens (identical tokens: {same}):\n",
        "| decoder | tokens / CPU s | speed vs base (CPU) | tokens / wall s |",
        "|---|---|---|---|",
    ]
    for name in functions:
        lines.append(f"| {name} | {count / cpu[name]:.1f} | {cpu[base] / cpu[name]:.3f}x | {count / wall[name]:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE,
                        help=f"classifier-free guidance scale; 1 = none (default {DEFAULT_GUIDANCE_SCALE})")
    parser.add_argument("--repeats", type=int, default=1, help="image runs per configuration (best is kept)")
    parser.add_argument("--text-repeats", type=int, default=3, help="text runs per decoder (best is kept)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--only", choices=("images", "text"), default=None, help="run one part only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    model = build_model(args.base)
    report = [
        "## Sampling benchmark",
        f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average before the run {os.getloadavg()[0]:.1f}.",
        f"Model: {args.base} + untrained image layers, 64 px pixel codec, patch 8 (fp32).",
    ]
    if args.only != "text":
        report += bench_images(model, SHORT_PROMPT, args)
        report += bench_images(model, LONG_PROMPT, args)
    if args.only != "images":
        report += bench_text(model, args)
    report.append(f"\nTotal {time.perf_counter() - started:.0f} s; load average after {os.getloadavg()[0]:.1f}.")
    print("\n".join(report))


if __name__ == "__main__":
    main()
