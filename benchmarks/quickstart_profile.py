"""Where a quickstart run's time goes, on this CPU: one training step by part, plus the side jobs.

Builds the quickstart model (SmolLM2-135M + TAEF2, 64 px, 2x2 patches, batch 16) on shapes
batches laid out by the run's own planner, and times, in one process:

* the real training step (lmfusion.training.loop.train_step), and its forward, backward and
  AdamW parts separately;
* the step as it is against the step without this project's CPU savings (frozen-context rows
  run with a graph; the foreach AdamW kernel instead of the fused one), interleaved in one loop;
* inside the step, the parts that can be run alone on the step's own shapes: the LM head on the
  scored rows, the U-Net down + up blocks, the attention kernel over all layers;
* the side jobs a quickstart run does besides stepping: a probe pass, a sample grid, a
  checkpoint write, each once, and what they add up to over the run's schedule.

    python benchmarks/quickstart_profile.py                    # this machine's CPU
    python benchmarks/quickstart_profile.py --isa avx2         # as on a CPU without AVX-512
    python benchmarks/quickstart_profile.py --isa avx2 --ops --batch-size 4   # torch.profiler's op table

`--isa avx2` caps ATen's and oneDNN's vector kernels at AVX2 (ATEN_CPU_CAPABILITY,
ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS): an emulation of an AVX2-only machine on this one,
not a measurement on one. Step parts are means over --steps steps after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def quickstart_training(overrides: dict | None = None, images: int = 64) -> dict:
    """The quickstart's model, optimizer and batch source on `images` shapes scenes, ready to step.

    Returns config, model, codec, data, source, optimizer, scheduler, plan and info: the arguments
    of lmfusion.training.loop.train_step and what the side jobs need. `overrides` are TrainConfig
    keys over the quickstart preset (`threads` sets torch's intra-op threads); `compile: true`
    compiles the decoder layers as training does.
    """
    import torch

    from lmfusion.data.images import pil_to_tensor
    from lmfusion.data.shapes import caption_for, render_scene, scene_for_index
    from lmfusion.training.config import load_config
    from lmfusion.training.data import CaptionLatents, build_batch_source
    from lmfusion.training.distributed import DistInfo
    from lmfusion.training.loop import StepPlan, build_model, build_optimizer, build_scheduler, resolve_precision
    from lmfusion.training.parallelize import compile_layers

    # precision "auto" made concrete as `lmfusion train` does (bf16 where native, else fp32)
    config = resolve_precision(load_config("quickstart", overrides={**(overrides or {}), "progress": False}), torch.device("cpu"))
    if config.threads:  # before the model is built, as `lmfusion train` does
        torch.set_num_threads(config.threads)
    model, codec = build_model(config)
    if config.compile:
        compile_layers(model)
    scenes = [scene_for_index(0, i, two_object_prob=0.0) for i in range(images)]
    pixels = torch.stack([pil_to_tensor(render_scene(objects, config.image_size)) for objects, _ in scenes])
    with torch.no_grad():
        data = CaptionLatents(codec.encode(pixels).float(), [caption_for(o, r) for o, r in scenes], {"source": "benchmark"})
    optimizer = build_optimizer(model, config)
    model.train()
    return {"config": config, "model": model, "codec": codec, "data": data,
            "source": build_batch_source(data, model, config), "optimizer": optimizer,
            "scheduler": build_scheduler(optimizer, config), "plan": StepPlan(config.batch_size, config.batch_size, 1),
            "info": DistInfo()}


def profile(steps: int, threads: int) -> dict:
    import torch

    from lmfusion.model.probes import image_probes
    from lmfusion.training import checkpoint as ckpt
    from lmfusion.training.loop import autocast, chunk_seed, train_step, write_samples, RunLog

    run = quickstart_training({"threads": threads})
    config, model, codec, data, source = run["config"], run["model"], run["codec"], run["data"], run["source"]
    optimizer, scheduler, plan, info = run["optimizer"], run["scheduler"], run["plan"], run["info"]
    result: dict = {"threads": threads, "batch": config.batch_size}

    # The real step, whole.
    step_times, tokens = [], []
    for step in range(steps + 1):
        start = time.perf_counter()
        metrics = train_step(step, model, model, source, optimizer, scheduler, config, plan, info)
        if step:
            step_times.append(time.perf_counter() - start)
            tokens.append(metrics["tokens"])
    result["step_s"] = sum(step_times) / steps
    result["tokens_per_step"] = sum(tokens) / steps

    # What this step saves over the earlier one, measured interleaved (A B A B ...) so that load
    # changes hit both alike: frozen-context rows with a graph, and the foreach AdamW kernel.
    import torch.optim

    # Fresh group dicts: an optimizer's param_groups carry its own `fused` flag, which would win.
    groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in optimizer.param_groups]
    fused, foreach = optimizer, torch.optim.AdamW(groups, foreach=True)
    assert fused.param_groups[0]["fused"] and not foreach.param_groups[0]["fused"]
    variants = {"now": (True, fused), "with_context_graph": (False, fused), "foreach_adamw": (True, foreach),
                "before": (False, foreach)}
    spent = dict.fromkeys(variants, 0.0)
    for step in range(1, steps + 2):
        for name, (skip, opt) in variants.items():
            model.skip_frozen_context = skip
            start = time.perf_counter()
            train_step(step, model, model, source, opt, scheduler, config, plan, info)
            if step > 1:
                spent[name] += (time.perf_counter() - start) / steps
    model.skip_frozen_context = True
    result["variants_step_s"] = spent

    # Its forward, backward and optimizer parts, on the same batches.
    parts = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    batch = None
    for step in range(steps + 1):
        batch = source.batch(plan.positions(step, 0))[0]
        generator = torch.Generator().manual_seed(chunk_seed(config.seed, step, 0))
        t0 = time.perf_counter()
        with autocast(config, info):
            sums = model.loss_sums(batch, generator)
            loss = sums.text / max(sums.text_tokens, 1) + 5 * sums.image / max(sums.images, 1)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if step:
            for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[key] += value / steps
    result.update({f"{k}_s": v for k, v in parts.items()})

    # Pieces of the step run alone on its shapes (forward + backward each).
    hidden = model.text_config.hidden_size
    wants, labels = batch.text_targets()
    scored = int(wants.sum())
    rows = torch.randn(scored, hidden, requires_grad=True)

    def head():
        logits = model.text_logits(rows)
        torch.nn.functional.cross_entropy(logits, labels).backward()

    n_images = batch.latents.shape[0]
    latents = batch.latents.clone()
    timesteps = torch.rand(n_images) * 999

    def unet():
        temb = model.time_embed(timesteps, latents.dtype)
        tokens_, skips = model.image_in(latents, temb)
        model.image_out(tokens_, skips, temb).square().mean().backward()

    attn = model.text_model.model.layers[0].self_attn
    heads, kv_heads = model.text_config.num_attention_heads, model.text_config.num_key_value_heads
    b, length = batch.input_ids.shape
    q = torch.randn(b, heads, length, attn.head_dim, requires_grad=True)
    k = torch.randn(b, kv_heads, length, attn.head_dim, requires_grad=True)
    v = torch.randn(b, kv_heads, length, attn.head_dim, requires_grad=True)
    from lmfusion.model.masks import image_segment_ids, transfusion_mask

    mask = transfusion_mask(image_segment_ids(batch.image_mask, model.config.tokens_per_image), batch.attention_mask)

    def attention():
        for _ in range(model.text_config.num_hidden_layers):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            out.sum().backward()

    repeats = max(1, steps)
    result["lm_head_s"] = _timed(head, repeats)
    result["unet_s"] = _timed(unet, repeats)
    result["attention_s"] = _timed(attention, repeats)
    result["scored_rows"] = scored
    result["text_rows"] = int((batch.attention_mask.bool() & ~batch.image_mask).sum())
    result["image_rows"] = int(batch.image_mask.sum())
    result["padded_positions"] = int((~batch.attention_mask.bool()).sum())
    model.zero_grad(set_to_none=True)

    # Side jobs, once each.
    probe = list(range(config.probe_images))
    probe_latents, probe_captions = data.latents(probe), [data.caption(i) for i in probe]
    start = time.perf_counter()
    image_probes(model, probe_latents, probe_captions, seed=0)
    result["probe_s"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        config_tmp = config.replace(runs_dir=tmp)
        (config_tmp.run_dir / "samples").mkdir(parents=True)
        log = RunLog(config_tmp.run_dir, True)
        start = time.perf_counter()
        write_samples(model, codec, data, config_tmp, 1, log)
        result["samples_s"] = time.perf_counter() - start
        start = time.perf_counter()
        ckpt.save_checkpoint(config_tmp.run_dir, 1, model, optimizer, scheduler, {"step": 1}, 2)
        result["checkpoint_s"] = time.perf_counter() - start
        log.close()
    model.train()

    n_probe = len([s for s in range(1, config.max_steps + 1) if s % config.probe_every == 0 or s == config.max_steps])
    n_samples = config.max_steps // config.sample_every if config.sample_every else 0
    n_ckpt = len([s for s in range(1, config.max_steps + 1) if s % config.checkpoint_every == 0 or s == config.max_steps])
    result["schedule"] = {"steps": config.max_steps, "probes": n_probe, "sample_grids": n_samples, "checkpoints": n_ckpt}
    result["run_estimate_s"] = {
        "steps": config.max_steps * result["step_s"], "probes": n_probe * result["probe_s"],
        "sample_grids": n_samples * result["samples_s"], "checkpoints": n_ckpt * result["checkpoint_s"]}
    return result


def op_table(steps: int, threads: int, batch_size: int) -> dict:
    """torch.profiler over `steps` real training steps at this batch size: seconds per step in all,
    and per op (self CPU time) for the ops that take the most."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from lmfusion.training.loop import train_step

    run = quickstart_training({"threads": threads, "batch_size": batch_size})
    model = run["model"]
    step_args = [run[k] for k in ("source", "optimizer", "scheduler", "config", "plan", "info")]
    train_step(0, model, model, *step_args)  # warm-up
    start = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in range(1, steps + 1):
            train_step(step, model, model, *step_args)
    seconds = (time.perf_counter() - start) / steps
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {"batch": batch_size, "precision": run["config"].precision, "step_s": seconds,
            "ops_s_per_step": {e.key: e.self_cpu_time_total / 1e6 / steps for e in ops},
            "calls_per_step": {e.key: e.count / steps for e in ops}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the quickstart uses 2)")
    parser.add_argument("--isa", choices=["native", "avx2"], default="native",
                        help="native: this CPU's best kernels; avx2: cap them at AVX2 (emulates a CPU without AVX-512)")
    parser.add_argument("--ops", action="store_true",
                        help="instead: the step's time per op (torch.profiler), at --batch-size")
    parser.add_argument("--batch-size", type=int, default=16, help="with --ops: the batch size (the quickstart's is 16)")
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: measure in this process
    args = parser.parse_args()
    if args.one:
        result = op_table(args.steps, args.threads, args.batch_size) if args.ops else profile(args.steps, args.threads)
        print("RESULT " + json.dumps(result))
        return
    env = {**os.environ, **ISA_ENV.get(args.isa, {})}
    command = [sys.executable, __file__, "--one", "--steps", str(args.steps), "--threads", str(args.threads),
               "--batch-size", str(args.batch_size)] + (["--ops"] if args.ops else [])
    load = os.getloadavg()[0]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"profile failed:\n{out.stderr[-3000:]}")
    r = json.loads(line[7:])
    r.update(isa=args.isa, machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), load_before=load,
             load_after=os.getloadavg()[0], command=" ".join(["python benchmarks/quickstart_profile.py"] + sys.argv[1:]))
    print(json.dumps(r, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(r, handle, indent=1)


if __name__ == "__main__":
    main()
