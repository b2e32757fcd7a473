"""First-run check on a GPU (under 5 minutes on one GPU): is LMFusion ready for it?

    python benchmarks/gpu_check.py                      # SmolLM2-135M on cuda:0
    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.md

Three checks, each reported in a Markdown table:
  1. training: bf16 autocast (or --precision fp32) steps of SmolLM2 with the fused layers (AdamW,
     clipping, the real train_step), tokens/s and peak GPU memory, with and without gradient checkpointing;
  2. text preservation: text-only logits of the LMFusion model equal the base model's in bf16;
  3. sampling: text-to-image speed with and without the prefix cache (same images either way).

Without a CUDA GPU it exits with status 2 and says so. `--device cpu` runs the same code on the
CPU (with a small --base) so the script itself can be tested anywhere.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_training(base: str, device: torch.device, steps: int, batch: int, checkpointing: bool,
                   precision: str = "bf16") -> dict:
    from lmfusion.data.images import pil_to_tensor
    from lmfusion.data.shapes import caption_for, render_scene, scene_for_index
    from lmfusion.training.config import TrainConfig
    from lmfusion.training.data import CaptionLatents, build_batch_source
    from lmfusion.training.distributed import DistInfo
    from lmfusion.training.loop import StepPlan, build_model, build_optimizer, build_scheduler, train_step

    config = TrainConfig(base_model=base, codec={"name": "pixel"}, image_size=64, patch_size=8, precision=precision,
                         batch_size=batch, max_steps=1000, warmup_steps=1, gradient_checkpointing=checkpointing)
    model, codec = build_model(config)
    model.to(device).train()
    scenes = [scene_for_index(0, i) for i in range(4 * batch)]
    pixels = torch.stack([pil_to_tensor(render_scene(objects, 64)) for objects, _ in scenes])
    data = CaptionLatents(codec.encode(pixels).float(), [caption_for(o, r) for o, r in scenes], {})
    source = build_batch_source(data, model, config)
    optimizer, info = build_optimizer(model, config), DistInfo(device=device)
    scheduler = build_scheduler(optimizer, config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens, seconds, losses = 0, 0.0, []
    for step in range(steps + 2):  # two warm-up steps (allocator, kernels) are not timed
        sync(device)
        start = time.perf_counter()
        metrics = train_step(step, model, model, source, optimizer, scheduler, config, StepPlan(batch, batch, 1), info)
        sync(device)
        losses.append(metrics["loss"])
        if step >= 2:
            tokens, seconds = tokens + metrics["tokens"], seconds + time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    ok = all(torch.isfinite(torch.tensor(losses)))
    del model, optimizer
    return {"checkpointing": checkpointing, "tok_s": tokens / seconds, "step_s": seconds / steps, "peak_gib": peak,
            "first_loss": losses[0], "last_loss": losses[-1], "ok": ok}


@torch.no_grad()
def check_text_logits(base: str, device: torch.device) -> dict:
    from lmfusion.base_models import load_text_model
    from lmfusion.config import LMFusionConfig
    from lmfusion.model.lmfusion import LMFusionModel

    text_model, tokenizer = load_text_model(base, dtype=torch.bfloat16)
    text_model.to(device).eval()
    model = LMFusionModel(copy.deepcopy(text_model), LMFusionConfig(base_model=base)).to(device, torch.bfloat16).eval()
    prompts = ["The capital of France is", "Once upon a time, in a land far away, there lived a"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    results = {}
    for name, kwargs in (("one prompt", dict(input_ids=batch.input_ids[:1, :5])),
                         ("padded batch", dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask))):
        if "attention_mask" in kwargs:  # the positions our model derives from the mask
            kwargs["position_ids"] = (kwargs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        expected = text_model(**kwargs).logits
        got = model(kwargs["input_ids"], attention_mask=kwargs.get("attention_mask")).logits[..., : expected.shape[-1]]
        if "attention_mask" in kwargs:  # padded positions are undefined in both
            keep = kwargs["attention_mask"].bool()
            expected, got = expected[keep], got[keep]
        results[name] = (torch.equal(got, expected), (got.float() - expected.float()).abs().max().item())
    return results


@torch.no_grad()
def check_sampling(base: str, device: torch.device, steps: int) -> dict:
    from lmfusion.config import LMFusionConfig
    from lmfusion.model.lmfusion import LMFusionModel
    from lmfusion.sampling.image import sample_latents

    model = LMFusionModel.from_text_model(base, LMFusionConfig(base_model=base)).to(device).eval()
    prompt = " ".join(["a small red circle above a large blue square on a white background"] * 6)
    out, times = {}, {}
    for name, cache in (("prefix cache", True), ("no prefix cache", False)):
        sample_latents(model, prompt, steps=2, seed=0, progress=False, cache_prefix=cache)  # warm-up
        sync(device)
        start = time.perf_counter()
        out[name] = sample_latents(model, prompt, steps=steps, seed=0, progress=False, cache_prefix=cache)
        sync(device)
        times[name] = time.perf_counter() - start
    diff = (out["prefix cache"] - out["no prefix cache"]).abs().max().item()
    return {"seconds": times, "max_diff": diff, "steps": steps, "sampler": model.objective.default_sampler}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2-135m", help="base LM (default smollm2-135m)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu, to test this script itself")
    parser.add_argument("--train-steps", type=int, default=20, help="timed training steps per setting (default 20)")
    parser.add_argument("--batch", type=int, default=16, help="examples per training step (default 16)")
    parser.add_argument("--sample-steps", type=int, default=50, help="denoising steps when timing sampling (default 50)")
    # bf16 is what a GPU trains in; a CPU without AVX-512-BF16 runs bf16 10-30x slower
    # (benchmarks/results/training_throughput.md), so the CPU self-test of this script trains in fp32.
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="training check's precision (default bf16; fp32 for a quick CPU self-test)")
    parser.add_argument("--out", default=None, help="also write the Markdown report to this file")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU is visible (torch {torch.__version__}, torch.cuda.is_available() is False); "
              "run it on a machine with an NVIDIA GPU and a CUDA build of torch", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    report = [f"# GPU check: {args.base} on {name}", "",
              f"`python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}` (torch {torch.__version__})", ""]
    failures = []

    autocast = "bf16 autocast" if args.precision == "bf16" else "fp32"
    report += [f"## Training, {autocast}, pixel codec 64 px, 8x8 patches", "",
               f"batch {args.batch}, {args.train_steps} timed steps after 2 warm-up steps", "",
               "| gradient checkpointing | tokens/s | s/step | peak GPU memory GiB | loss first -> last |", "|---|---|---|---|---|"]
    for checkpointing in (False, True):
        row = check_training(args.base, device, args.train_steps, args.batch, checkpointing, args.precision)
        report.append(f"| {'on' if checkpointing else 'off'} | {row['tok_s']:.0f} | {row['step_s']:.3f} | "
                      f"{row['peak_gib']:.2f} | {row['first_loss']:.3f} -> {row['last_loss']:.3f} |")
        if not row["ok"]:
            failures.append(f"training (checkpointing {checkpointing}): non-finite loss")

    report += ["", "## Text-only logits vs the base model, bf16", "", "| input | bit-identical | max abs diff |", "|---|---|---|"]
    for case, (same, diff) in check_text_logits(args.base, device).items():
        report.append(f"| {case} | {same} | {diff:.3g} |")
        if not same:
            failures.append(f"text logits ({case}) differ from the base model by up to {diff:.3g}")

    sampling = check_sampling(args.base, device, args.sample_steps)
    report += ["", f"## Text-to-image sampling, {sampling['steps']} {sampling['sampler']} steps, one image, long prompt", "",
               "| configuration | seconds | speed-up |", "|---|---|---|"]
    slow = sampling["seconds"]["no prefix cache"]
    for case, seconds in sampling["seconds"].items():
        report.append(f"| {case} | {seconds:.2f} | {slow / seconds:.2f}x |")
    report.append(f"\nmax abs difference between the two samples: {sampling['max_diff']:.2g}")
    if sampling["max_diff"] > 1e-2:
        failures.append(f"prefix cache changes the sample by {sampling['max_diff']:.2g}")

    report += ["", f"Total {time.perf_counter() - started:.0f} s. " + ("All checks passed." if not failures else
                                                                       "FAILED: " + "; ".join(failures))]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
