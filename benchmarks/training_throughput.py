"""Training throughput of LMFusion on this machine: tokens/s and peak RSS per configuration.

Each configuration runs in its own subprocess (peak RSS is per process) through the real training
step (lmfusion.training.loop.train_step: AdamW, clipping, the global loss normalisation), on
batches of shapes captions + images encoded by the configuration's codec.

    python benchmarks/training_throughput.py                       # the default table
    python benchmarks/training_throughput.py --steps 5 --only pixel:8:fp32 taef2:2:bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

DEFAULT = ["pixel:8:fp32", "pixel:8:bf16", "taef2:2:fp32", "taef2:2:bf16", "taef2:1:fp32", "taef2:1:bf16"]
TAEF2 = os.environ.get("LMFUSION_TAEF2", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "taef2"))


def measure(spec: str, steps: int, batch: int, base_model: str, gradient_checkpointing: bool, threads: int) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)

    from lmfusion.data.shapes import render_scene, scene_for_index, caption_for
    from lmfusion.training.config import TrainConfig
    from lmfusion.training.data import CaptionLatents, build_batch_source
    from lmfusion.training.distributed import DistInfo
    from lmfusion.training.loop import StepPlan, build_model, build_optimizer, build_scheduler, train_step
    from lmfusion.data.images import pil_to_tensor

    name, patch, precision = spec.split(":")
    codec = {"name": "pixel"} if name == "pixel" else {"name": "taef2", "path": os.path.abspath(TAEF2)}
    config = TrainConfig(base_model=base_model, codec=codec, image_size=64, patch_size=int(patch), precision=precision,
                         batch_size=batch, max_steps=1000, warmup_steps=1, gradient_checkpointing=gradient_checkpointing)
    model, codec_module = build_model(config)
    scenes = [scene_for_index(0, i) for i in range(4 * batch)]
    pixels = torch.stack([pil_to_tensor(render_scene(objects, 64)) for objects, _ in scenes])
    data = CaptionLatents(codec_module.encode(pixels).float(), [caption_for(o, r) for o, r in scenes], {})
    source = build_batch_source(data, model, config)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    plan = StepPlan(batch, batch, 1)
    model.train()
    times, tokens = [], []
    for step in range(steps + 1):  # step 0 warms up allocators and kernels
        start = time.perf_counter()
        metrics = train_step(step, model, model, source, optimizer, scheduler, config, plan, DistInfo())
        if step:
            times.append(time.perf_counter() - start)
            tokens.append(metrics["tokens"])
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return {"spec": spec, "codec": name, "patch": int(patch), "precision": precision,
            "tokens_per_image": model.config.tokens_per_image, "seq_tokens": sum(tokens) / len(tokens) / batch,
            "step_s": sum(times) / len(times), "tokens_per_s": sum(tokens) / sum(times),
            "images_per_s": batch * len(times) / sum(times), "peak_rss_gb": peak_gb, "loss": metrics["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=DEFAULT, help="codec:patch:precision entries")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after 1 warm-up)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one spec, print JSON
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args.steps, args.batch, args.base_model, args.gradient_checkpointing, args.threads)))
        return

    import torch

    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads or torch.get_num_threads()} threads; load average at start {os.getloadavg()[0]:.1f}")
    print(f"# base {args.base_model}, batch {args.batch}, 64 px, {args.steps} timed steps after 1 warm-up"
          + (", gradient checkpointing" if args.gradient_checkpointing else ""))
    print("| codec | patch | tokens/image | precision | tokens/seq | s/step | tokens/s | images/s | peak RSS GB | load after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for spec in args.only:
        if spec.startswith("taef2") and not os.path.isdir(TAEF2):
            print(f"| {spec} | skipped: no TAEF2 weights at {TAEF2} (set LMFUSION_TAEF2) |")
            continue
        command = [sys.executable, __file__, "--one", spec, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--base-model", args.base_model, "--threads", str(args.threads)] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
        out = subprocess.run(command, capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"| {spec} | failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode} |")
            continue
        r = json.loads(line[7:])
        r["load"] = os.getloadavg()[0]
        print(f"| {r['codec']} | {r['patch']} | {r['tokens_per_image']} | {r['precision']} | {r['seq_tokens']:.0f} | "
              f"{r['step_s']:.1f} | {r['tokens_per_s']:.0f} | {r['images_per_s']:.2f} | {r['peak_rss_gb']:.2f} | {r['load']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
