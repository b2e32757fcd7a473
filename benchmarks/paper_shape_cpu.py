"""Training speed at the paper's token shape on this CPU: packed vs unpacked, LMFusion vs full fine-tune.

The paper's images are 256 tokens each. Here: SmolLM2-135M, TAEF2 at 256 px (32x32x32 latents),
2x2 patches = 256 tokens per image, shapes captions, the paper's 80/20 caption-first mix. Four
configurations are built in ONE process and their training steps interleaved (A B C D A B C D
...), so a change of machine load hits all of them alike:

* lmfusion, unpacked: each micro-batch right-padded to its longest example (what runs today);
* lmfusion, packed: the same examples concatenated into rows of --pack-length tokens;
* dense (a full fine-tune of the base model: one set of weights for text and image tokens, all
  trained), unpacked and packed, on the same examples and tokens.

Every configuration sees the same examples (the same seed and planner), so tokens/s compares
like with like; "real tokens" excludes padding.

    python benchmarks/paper_shape_cpu.py                  # writes benchmarks/results/paper_shape_cpu.{md,json}
    python benchmarks/paper_shape_cpu.py --steps 1 --batch 4 --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _examples(n: int, size: int, codec):
    import torch

    from lmfusion.data.images import pil_to_tensor
    from lmfusion.data.shapes import caption_for, render_scene, scene_for_index
    from lmfusion.training.data import CaptionLatents

    scenes = [scene_for_index(0, i) for i in range(n)]
    pixels = torch.stack([pil_to_tensor(render_scene(objects, size)) for objects, _ in scenes])
    with torch.no_grad():
        latents = torch.cat([codec.encode(chunk).float() for chunk in pixels.split(16)])
    return CaptionLatents(latents, [caption_for(o, r) for o, r in scenes], {"source": "shapes (benchmark)"})


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from lmfusion.training.config import TrainConfig
    from lmfusion.training.data import build_batch_source
    from lmfusion.training.distributed import DistInfo
    from lmfusion.training.loop import StepPlan, build_model, build_optimizer, build_scheduler, train_step

    base = dict(base_model=args.base_model, codec={"name": "taef2"}, image_size=256, patch_size=2,
                image_first_ratio=0.2, caption_dropout=0.1, batch_size=args.batch, max_steps=1000, warmup_steps=1,
                lr=1e-4, min_lr=1e-5, progress=False, precision="fp32")
    has_packing = "pack_length" in TrainConfig.__dataclass_fields__
    configs = {}
    for mode in ("lmfusion", "dense"):
        configs[f"{mode} unpacked"] = TrainConfig(mode=mode, **base)
        if has_packing:
            configs[f"{mode} packed {args.pack_length}"] = TrainConfig(mode=mode, pack_length=args.pack_length, **base)
    runs, data = {}, None
    for name, config in configs.items():
        model, codec = build_model(config)
        if data is None:
            data = _examples(4 * args.batch, config.image_size, codec)
        source = build_batch_source(data, model, config)
        optimizer = build_optimizer(model, config)
        runs[name] = dict(model=model.train(), source=source, optimizer=optimizer,
                          scheduler=build_scheduler(optimizer, config), config=config,
                          time=0.0, tokens=0, positions=0, rows=0)
    plan, info = StepPlan(args.batch, args.batch, 1), DistInfo()
    for step in range(args.steps + 1):  # step 0 warms up allocators and kernels
        for name, r in runs.items():
            batch = r["source"].batch(plan.positions(step, 0))[0]
            start = time.perf_counter()
            metrics = train_step(step, r["model"], r["model"], r["source"], r["optimizer"], r["scheduler"],
                                 r["config"], plan, info)
            if step:
                r["time"] += time.perf_counter() - start
                r["tokens"] += metrics["tokens"]
                r["positions"] += batch.input_ids.numel()
                r["rows"] += batch.input_ids.shape[0]
    table = {}
    for name, r in runs.items():
        table[name] = {"step_s": r["time"] / args.steps, "real_tokens_per_s": r["tokens"] / r["time"],
                       "positions_per_step": r["positions"] / args.steps, "rows_per_step": r["rows"] / args.steps,
                       "real_tokens_per_step": r["tokens"] / args.steps,
                       "fill": r["tokens"] / r["positions"],
                       "trainable_parameters": sum(p.numel() for p in r["model"].parameters() if p.requires_grad)}
    return {"table": table, "packing_available": has_packing, "tokens_per_image": 256, "batch": args.batch,
            "steps": args.steps, "threads": args.threads, "pack_length": args.pack_length}


def write(result: dict, out: Path, command: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    reference = result["table"].get("lmfusion unpacked")
    lines = [
        "# Training speed at the paper's token shape, on a CPU",
        "",
        f"Command: `{command}`",
        f"Machine: {result['machine']}, {result['cpus']} CPUs, {result['threads']} torch threads; "
        f"load average {result['load_before']:.1f} before, {result['load_after']:.1f} after.",
        f"SmolLM2-135M, TAEF2 at 256 px with 2x2 patches ({result['tokens_per_image']} tokens per image), "
        f"batch {result['batch']} examples per step, {result['steps']} timed steps after one warm-up, fp32; "
        "all configurations built in one process and stepped in turn.",
        "",
        "| configuration | trainable params | rows/step | positions/step | real tokens/step | fill | s/step | real tok/s | vs lmfusion unpacked |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["table"].items():
        ratio = r["real_tokens_per_s"] / reference["real_tokens_per_s"] if reference else float("nan")
        lines.append(f"| {name} | {r['trainable_parameters'] / 1e6:.0f}M | {r['rows_per_step']:.1f} | "
                     f"{r['positions_per_step']:.0f} | {r['real_tokens_per_step']:.0f} | {r['fill']:.2f} | "
                     f"{r['step_s']:.2f} | {r['real_tokens_per_s']:.0f} | {ratio:.2f}x |")
    if not result["packing_available"]:
        lines += ["", "Packing (`pack_length`) is not in this build: only the unpacked rows were measured."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--batch", type=int, default=8, help="examples per step")
    parser.add_argument("--pack-length", type=int, default=1024, help="tokens per packed row")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--base-model", default="smollm2-135m", help="base LM (name, HF id or local folder)")
    parser.add_argument("--out", default=str(RESULTS / "paper_shape_cpu"), help="output path without suffix")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    result = run(args)
    result.update(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), load_before=load,
                  load_after=os.getloadavg()[0])
    import sys

    command = " ".join(["python benchmarks/paper_shape_cpu.py"] + sys.argv[1:])
    write(result, Path(args.out), command)
    print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
