"""Training tok/s, MFU and peak memory on a GPU at the paper's token shape, feature by feature.

Two models, both with 256-token images (TAEF2 at 256 px, 2x2 patches) and bf16 autocast:
SmolLM2-135M (the project's default base) and a randomly initialised Llama at 1B shape (hidden
2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocabulary 49152). For each, four
configurations, each adding one thing to the one before:

    eager      padded rows, dense-mask SDPA (what ran before packing existed)
    +packing   pack_length 4096: whole examples concatenated into 4,096-token rows
    +flex      attention: flex (flex_attention with a block-sparse BlockMask)
    +compile   compile: true (each fused decoder layer through torch.compile)

Each configuration runs the real training step (lmfusion.training.loop.train_step: AdamW,
clipping, global loss normalisation) for --warmup untimed and --steps timed steps, with CUDA
synchronised around each; MFU = model FLOPs per second (lmfusion.training.metrics.step_flops,
docs/mfu.md) / the device's bf16 peak. Results go to benchmarks/results/gpu_mfu.{md,json}.

    python benchmarks/gpu_mfu.py                           # on a GPU, a few minutes
    python benchmarks/gpu_mfu.py --smoke --device cpu      # tiny sizes, fp32, 1 step: checks the script anywhere

Targets (issue 17): at least 15% MFU for 135M and 35% for the 1B shape.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                tie_word_embeddings=True)
FEATURES = [("eager", {}), ("+packing", {"pack_length": None}), ("+flex", {"attention": "flex"}),
            ("+compile", {"compile": True})]


def random_llama(folder: Path, smoke: bool) -> str:
    """A randomly initialised Llama saved with SmolLM2's tokenizer (ids must fit its vocabulary)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lmfusion.base_models import resolve_base_model

    shape = dict(LLAMA_1B) if not smoke else dict(LLAMA_1B, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_base_model("smollm2-135m")).save_pretrained(folder)
    return str(folder)


def measure(base: str, features: dict, args, device: torch.device) -> dict:
    from lmfusion.data.images import pil_to_tensor
    from lmfusion.data.shapes import caption_for, render_scene, scene_for_index
    from lmfusion.training.config import TrainConfig
    from lmfusion.training.data import CaptionLatents, build_batch_source
    from lmfusion.training.distributed import DistInfo
    from lmfusion.training.loop import StepPlan, build_model, build_optimizer, build_scheduler, train_step
    from lmfusion.training.metrics import peak_flops
    from lmfusion.training.parallelize import compile_layers

    values = dict(base_model=base, codec={"name": "taef2"}, image_size=args.image_size, patch_size=2,
                  precision="fp32" if device.type == "cpu" else "bf16", batch_size=args.batch, max_steps=1000,
                  warmup_steps=1, progress=False, image_first_ratio=0.2)
    values.update({k: (args.pack_length if v is None else v) for k, v in features.items()})
    config = TrainConfig(**values)
    model, codec = build_model(config)
    if config.compile:
        compile_layers(model)
    model.to(device).train()
    scenes = [scene_for_index(0, i) for i in range(2 * args.batch)]
    pixels = torch.stack([pil_to_tensor(render_scene(objects, args.image_size)) for objects, _ in scenes])
    with torch.no_grad():
        latents = torch.cat([codec.to(device).encode(p.to(device)).float().cpu() for p in pixels.split(16)])
    source = build_batch_source(CaptionLatents(latents, [caption_for(o, r) for o, r in scenes], {}), model, config)
    optimizer, info = build_optimizer(model, config), DistInfo(device=device)
    scheduler, plan = build_scheduler(optimizer, config), StepPlan(args.batch, args.batch, 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = tokens = flops = 0.0
    fill = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        metrics = train_step(step, model, model, source, optimizer, scheduler, config, plan, info)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            seconds += time.perf_counter() - start
            tokens += metrics["tokens"]
            flops += metrics["model_flops"]
            fill.append(metrics["packing_efficiency"])
    peak = peak_flops(device)
    return {"tokens_per_s": tokens / seconds, "step_s": seconds / args.steps, "flops_per_s": flops / seconds,
            "mfu": None if peak is None else flops / seconds / peak, "fill": sum(fill) / len(fill),
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "tokens_per_step": tokens / args.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke, to check the script)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels, compilation)")
    parser.add_argument("--batch", type=int, default=56, help="examples per step (56 x ~290 tokens = 4 packs of 4,096)")
    parser.add_argument("--pack-length", type=int, default=4096, help="tokens per packed row")
    parser.add_argument("--image-size", type=int, default=256, help="pixels per side (256: 256 tokens per image)")
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "llama-1b"], help="smollm2-135m and/or llama-1b")
    parser.add_argument("--only", nargs="+", default=[f for f, _ in FEATURES], help="configurations to run")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and one step each (a check, not a benchmark)")
    parser.add_argument("--out", default=str(RESULTS / "gpu_mfu"), help="output path without suffix")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here; use --smoke --device cpu to check the script")
    if args.smoke:
        args.steps, args.warmup, args.batch, args.pack_length, args.image_size = 1, 1, 4, 512, 64
    rows, cumulative = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            base = "smollm2-135m" if name == "smollm2-135m" else random_llama(Path(tmp) / "llama-1b", args.smoke)
            cumulative = {}
            for feature, change in FEATURES:
                cumulative.update(change)
                if feature not in args.only:
                    continue
                if feature == "+flex" and device.type == "cpu":
                    rows.append({"model": name, "config": feature, "skipped": "flex has no CPU backward"})
                    continue
                try:
                    rows.append({"model": name, "config": feature, **measure(base, dict(cumulative), args, device)})
                except Exception as error:  # one failing feature must not lose the others' numbers
                    rows.append({"model": name, "config": feature, "error": f"{type(error).__name__}: {error}"[:300]})
                print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"device": name, "args": vars(args), "rows": rows}, indent=1) + "\n")
    lines = [f"# Training MFU on {name}", "", f"Command: `python benchmarks/gpu_mfu.py {' '.join(sys.argv[1:])}`",
             f"{(args.image_size // 16) ** 2}-token images, {'fp32' if device.type == 'cpu' else 'bf16'}, "
             f"{args.batch} examples per step, {args.steps} timed steps after {args.warmup} untimed.", "",
             "| model | configuration | tok/s | MFU | TFLOP/s | fill | peak GiB | s/step |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['model']} | {r['config']} | {r.get('skipped') or r.get('error')} |")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        lines.append(f"| {r['model']} | {r['config']} | {r['tokens_per_s']:.0f} | {mfu} | {r['flops_per_s'] / 1e12:.2f} | "
                     f"{r['fill']:.2f} | {mem} | {r['step_s']:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
