"""The training loop: text cross-entropy + lambda x diffusion MSE on the image modules only.

One optimizer step sees `batch_size` examples in total, split into micro-batches of
`micro_batch_size` per forward pass: chunk j of step s covers global sample positions
[s*batch + j*micro, s*batch + (j+1)*micro) and draws its diffusion noise from a generator seeded
by (seed, s, j). Rank r runs chunks r*accum ... r*accum + accum - 1. So 1 process with 2
accumulation steps and 2 processes with 1 each compute the same chunks with the same noise, and
a resumed run continues with exactly the chunks an uninterrupted one would have used.

The loss is normalised over the GLOBAL step, as in Transfusion: per-token for text, per-image for
diffusion. Each chunk contributes (its CE sum) / (text tokens in the whole step) + lambda x (its
per-image MSE sum) / (images in the whole step); the counts are known before any forward pass,
so they are all-reduced first, and the gradients are summed over ranks.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from .config import TrainConfig
from ..model.probes import bypass_warning, image_probes
from .ema import WeightAverage
from .data import BatchSource, build_batch_source, ensure_dataset, open_latent_store, probe_records
from .metrics import peak_flops, step_flops, unet_forward_flops
from .parallelize import compile_layers
from .distributed import (DistInfo, all_reduce_sum, barrier, broadcast_buffers, broadcast_object, clip_gradients,
                          init_distributed, is_sharded, local_numel, no_sync, shutdown, wrap_model)
from .samples import write_samples
from .step_batches import step_loader


# --------------------------------------------------------------------------- construction
def build_codec(config: TrainConfig):
    from ..codecs import load_codec

    return load_codec(**config.codec)


def build_model(config: TrainConfig, codec=None):
    """The LMFusion model (seeded, so the fresh U-Net weights are reproducible) and its codec."""
    from ..config import LMFusionConfig
    from ..model.lmfusion import LMFusionModel

    codec = codec or build_codec(config)
    latent_channels, latent_size, _ = codec.latent_shape(config.image_size)
    model_config = LMFusionConfig(
        base_model=config.base_model, mode=config.mode, attention=config.attention, codec=codec.config(),
        image_size=config.image_size,
        latent_channels=latent_channels, latent_size=latent_size, patch_size=config.patch_size,
        **{"guidance_scale": config.guidance_scale, "image_guidance_scale": config.image_guidance_scale,
           **config.model},  # a model: {guidance_scale: ..} wins
    )
    torch.manual_seed(config.seed)
    model = LMFusionModel.from_text_model(config.base_model, model_config)
    model.skip_frozen_context = config.skip_frozen_context
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model, codec


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (and conv kernels), never on norms and biases.

    Freshly initialised modules (U-Net blocks, timestep MLP, BOI/EOI rows) train at
    lr x fresh_lr_scale; the layers copied from the base LM at lr (the paper's eta_img).
    """
    groups = []
    for fresh in (False, True):
        params = [p for name, p in model.named_parameters() if p.requires_grad and model.is_fresh(name) == fresh]
        lr = config.lr * (config.fresh_lr_scale if fresh else 1.0)
        groups += [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay, "lr": lr},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": lr},
        ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                             fused=config.parallel != "fsdp" and use_fused_adamw(groups))


def use_fused_adamw(groups: list[dict]) -> bool:
    """The fused AdamW kernel where it applies: plain (unsharded) fp32 tensors on a CPU or a GPU.

    A `parallel: fsdp` run keeps foreach even in one process, so that it computes what the same
    run on N ranks (DTensor shards, foreach only) computes, to the last bit of rounding.

    With it a quickstart step (106M trainable weights, 2 CPU cores) took 4-10% less time than with the
    default foreach kernel (benchmarks/results/quickstart_profile.md); FSDP's DTensor shards keep foreach.
    """
    from torch.distributed.tensor import DTensor

    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda")
                                and p.dtype == torch.float32 for p in params)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr at max_steps (multiplier of lr)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    floor = config.min_lr / config.lr if config.lr else 0.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))


# --------------------------------------------------------------------------- objective
def loss_sums(forward, model, batch, generator: torch.Generator):
    """The model's loss sums and counts (LMFusionModel.loss_sums) through `forward`, the
    possibly DDP-wrapped model, so they can be normalised over several chunks and ranks."""
    return model.loss_sums(batch, generator, forward=forward)


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, 0xD1FF, step, chunk]).generate_state(1)[0])


# --------------------------------------------------------------------------- one step
@dataclass
class StepPlan:
    batch_size: int
    micro: int
    accum: int

    def positions(self, step: int, chunk: int) -> range:
        start = step * self.batch_size + chunk * self.micro
        return range(start, start + self.micro)


def train_step(step: int, wrapped, model, source: BatchSource, optimizer, scheduler, config: TrainConfig,
               plan: StepPlan, info: DistInfo, batches=None) -> dict:
    """One optimizer step; `batches` are this rank's micro-batches (built from `source` when None)."""
    chunks = [info.rank * plan.accum + a for a in range(plan.accum)]
    if batches is None:
        batches = [source.batch(plan.positions(step, j))[0] for j in chunks]
    batches = [b.to(info.device) for b in batches]
    local = torch.tensor([[b.text_targets()[1].numel(), b.num_loss_images, b.num_tokens,
                           step_flops(model, b)["total"]] for b in batches], dtype=torch.float64).sum(0)
    positions = sum(b.input_ids.numel() for b in batches)
    n_text, n_images, n_tokens, flops = all_reduce_sum(local, info).tolist()
    weight = model.config.diffusion_loss_weight
    sums = torch.zeros(2, dtype=torch.float64)
    for index, (j, batch) in enumerate(zip(chunks, batches)):
        generator = torch.Generator().manual_seed(chunk_seed(config.seed, step, j))
        with no_sync(wrapped, skip=index < len(batches) - 1), autocast(config, info):
            part = loss_sums(wrapped, model, batch, generator)
            loss = part.text / max(n_text, 1) + weight * part.image / max(n_images, 1)
        (loss * info.world_size).backward()  # DDP averages over ranks; we want the sum
        sums += torch.stack([part.text.detach().double().cpu(), part.image.detach().double().cpu()])
    text_sum, image_sum = all_reduce_sum(sums, info).tolist()
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = clip_gradients(params, config.grad_clip if config.grad_clip > 0 else float("inf"))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if is_sharded(model):
        broadcast_buffers(model, info)
    text_loss, image_loss = text_sum / max(n_text, 1), image_sum / max(n_images, 1)
    return {"loss": text_loss + weight * image_loss, "text_loss": text_loss, "image_loss": image_loss,
            "grad_norm": float(grad_norm), "lr": lr, "text_tokens": int(n_text), "images": int(n_images),
            "tokens": int(n_tokens), "model_flops": flops,
            "packing_efficiency": float(local[2]) / max(positions, 1)}  # this rank's real tokens / positions


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here: a CUDA device with bf16, or a CPU with AVX-512-BF16 or AMX.

    Elsewhere (an AVX2 CPU) bf16 autocast runs 10-30x slower than fp32 (benchmarks/results/
    training_throughput.md); on a Zen 4 CPU with AVX-512-BF16 a quickstart step took 0.66x its fp32 time.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # private but long-standing torch.cpu helpers (cpuinfo flags)
        if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
            return False  # kernels capped below AVX-512 (ATEN_CPU_CAPABILITY): bf16 would be emulated
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_precision(config: TrainConfig, device: torch.device) -> TrainConfig:
    """`precision: auto` made concrete for this device, so config.yaml and resume see what ran."""
    if config.precision != "auto":
        return config
    return replace(config, precision="bf16" if native_bf16(device) else "fp32")


def autocast(config: TrainConfig, info: DistInfo):
    return torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")


# --------------------------------------------------------------------------- the run
def train(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Train (or continue) the run `config.run_dir`; returns a summary (paths, final losses, timing)."""
    info = init_distributed()
    try:
        return _train(config, info, resume, overwrite)
    finally:
        shutdown(info)


def check_parallel(config: TrainConfig, info: DistInfo) -> None:
    """Refuse what a sharded run cannot do yet, before any work.

    A text-only micro-batch leaves the image weights of every FSDP unit without gradients on that
    rank while another rank has them, and the gradient reduce-scatter then waits forever (seen
    on gloo). DDP is told to expect unused parameters (find_unused_parameters) instead.
    """
    if config.attention == "flex" and info.device.type == "cpu":
        raise ValueError("attention: flex trains only on a GPU (torch's flex_attention has no CPU backward); "
                         "use attention: sdpa on a CPU")
    if config.parallel == "fsdp" and config.ema_decay > 0:
        raise ValueError("ema_decay > 0 is not supported with parallel: fsdp yet (the average would need sharding "
                         "too); use parallel: ddp, or ema_decay: 0")
    if config.parallel == "fsdp" and info.enabled and config.text_only_ratio > 0:
        raise ValueError("parallel: fsdp does not support text_only_ratio > 0 yet (a text-only micro-batch "
                         "leaves image weights without gradients on one rank); use parallel: ddp")


def _train(config: TrainConfig, info: DistInfo, resume: bool, overwrite: bool) -> dict:
    started = time.time()
    check_parallel(config, info)
    config = resolve_precision(config, info.device)
    if config.init_from:  # before any data is generated or encoded: a missing start fails in a second
        ckpt.init_folder(config.init_from)
    if config.threads:
        torch.set_num_threads(config.threads)
    micro, accum = config.split_batch(info.world_size)
    plan = StepPlan(config.batch_size, micro, accum)
    if info.is_main:
        ckpt.prepare_run_dir(config, resume, overwrite)
        ensure_dataset(config)
    barrier(info)
    log = RunLog(config.run_dir, info.is_main)
    try:
        data, model, codec = _load_data_and_model(config, info, log)
        log.data_stats(data)
        if config.init_from:  # before wrapping (FSDP shards the parameters); --resume then overrides
            ckpt.load_init_weights(model, config.init_from, say=log.say)
        source = build_batch_source(data, model, config)
        unet_forward_flops(model)  # calibrated (and cached) before compile and FSDP change the modules
        if config.compile:  # after activation checkpointing (build_model), before FSDP (wrap_model)
            compile_layers(model)
        # Wrap first: FSDP replaces the parameters with shards, which the optimizer must hold.
        # a micro-batch of only text rows leaves the image modules unused (text-only examples; chat's text replies)
        wrapped = wrap_model(model, info, find_unused=config.text_only_ratio > 0 or getattr(data, "is_chat", False),
                             parallel=config.parallel)
        sharded = is_sharded(model)
        optimizer = build_optimizer(model, config)
        scheduler = build_scheduler(optimizer, config)
        average = WeightAverage(model, config.ema_decay) if config.ema_decay > 0 else None
        step = _maybe_resume(config, resume, model, optimizer, scheduler, log, info, sharded, average)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.say(f"{trainable / 1e6:.1f}M trainable parameters; {info.world_size} process(es) x {accum} "
                f"micro-batch(es) of {micro} = batch {config.batch_size}; {config.precision}; device {info.device}"
                + ("; FSDP2 sharded" if sharded else ""))

        probes = None
        if config.probe_every and sharded:  # probes run on rank 0 alone; a sharded forward needs every rank
            log.say("probes: skipped under parallel: fsdp")
        elif config.probe_every and (getattr(data, "is_edit", False) or getattr(data, "is_chat", False)):
            kind = "editing" if getattr(data, "is_edit", False) else "chat"
            log.say(f"probes: skipped for {kind} data (they read image-caption records)")
        elif config.probe_every and info.is_main:
            probes = probe_records(config.data, config.image_size, codec, config.probe_images)
            log.say(f"probes: {len(probes[1])} images from the {probes[2]}, every {config.probe_every} steps")
        peak = peak_flops(info.device)
        history, first_step = [], step
        progress = log.progress(config, step)
        steps = iter(step_loader(source, plan, info.rank, step, config.max_steps, config.data_workers))
        while step < config.max_steps:
            tick = time.time()
            _, batches = next(steps)
            metrics = train_step(step, wrapped, model, source, optimizer, scheduler, config, plan, info, batches)
            if average is not None:
                average.update(model)
            step += 1
            metrics.update(step=step, step_time=time.time() - tick)
            metrics["tokens_per_s"] = metrics["tokens"] / metrics["step_time"]
            metrics["flops_per_s"] = metrics["model_flops"] / metrics["step_time"]
            if peak:  # MFU only where the device's peak is known (not on a CPU)
                metrics["mfu"] = metrics["flops_per_s"] / (peak * info.world_size)
            if probes is not None and (step % config.probe_every == 0 or step == config.max_steps):
                metrics.update(log.probes(image_probes(model, probes[0], probes[1], seed=config.seed), step,
                                          config.warmup_steps))
            history.append(metrics)
            log.step(metrics, progress, every=config.log_every)
            if step == first_step + 1:
                log_shards(model, optimizer, info, log)
            if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == config.max_steps:
                _save(config, info, step, model, optimizer, scheduler, metrics, len(data), log, sharded, average)
            # A sharded model's forward is collective: every rank samples, rank 0 writes.
            if config.sample_every and step % config.sample_every == 0 and (info.is_main or sharded):
                write_samples(model, codec, data, config, step, log)
        progress.close()
    finally:
        log.close()
    latest = ckpt.latest_checkpoint(config.run_dir) if info.is_main else None
    return {"run_dir": str(config.run_dir), "steps": step, "first_step": first_step,
            "final": history[-1] if history else {}, "history": history, "wall_time": time.time() - started,
            "train_time": sum(m["step_time"] for m in history), "checkpoint": str(latest or "")}


def _load_data_and_model(config: TrainConfig, info: DistInfo, log):
    """Latents first, so a bad dataset fails in seconds; rank 0 fills the cache, the others read it.
    The latents stay on the CPU (or on disk): each step's batches move to the device."""
    codec = build_codec(config)
    if info.is_main:
        data = open_latent_store(config, codec, config.progress, say=log.say)
    barrier(info)
    if not info.is_main:
        data = open_latent_store(config, codec, progress=False, say=log.say)
    model, codec = build_model(config, codec)
    model.to(info.device).train()
    return data, model, codec


def _maybe_resume(config: TrainConfig, resume: bool, model, optimizer, scheduler, log, info: DistInfo,
                  sharded: bool, average: WeightAverage | None = None) -> int:
    """The step to start from: the newest intact checkpoint's with --resume (state restored), else 0."""
    if not resume:
        return 0
    if sharded:  # rank 0 verifies and chooses, every rank loads its shards of that one
        choice = None
        if info.is_main:
            try:
                found = ckpt.find_intact_sharded(config.run_dir, info.world_size, say=log.say)
                choice = ("ok", str(found) if found else None)
            except ckpt.CheckpointError as error:
                choice = ("error", str(error))
        kind, value = broadcast_object(choice, info)
        if kind == "error":
            raise ckpt.CheckpointError(value)
        loaded = None if value is None else (Path(value), ckpt.load_sharded_checkpoint(value, model, optimizer, scheduler))
    else:
        loaded = ckpt.load_newest_intact(config.run_dir, model, optimizer, scheduler, say=log.say, average=average)
    if loaded is None:
        log.say(f"--resume: no checkpoint in {config.run_dir} yet, starting from step 0")
        return 0
    found, state = loaded
    log.say(f"resumed from {found} at step {state['step']}")
    if state.get("max_steps", config.max_steps) != config.max_steps:
        log.say(f"note: max_steps changed from {state['max_steps']} to {config.max_steps}: the cosine schedule "
                "is stretched from here on, so this is not the run an uninterrupted job would have made")
    return state["step"]


def _save(config: TrainConfig, info: DistInfo, step: int, model, optimizer, scheduler, metrics: dict, n_records: int,
          log, sharded: bool, average: WeightAverage | None = None) -> None:
    """DDP: rank 0 writes (every rank holds the same state) and the others wait so no rank races
    ahead. FSDP: every rank writes its shards (collective)."""
    state = {"samples_seen": step * config.batch_size, "epoch": step * config.batch_size // n_records,
             "max_steps": config.max_steps, "world_size": info.world_size, "parallel": config.parallel,
             "metrics": metrics}
    if sharded:
        path = ckpt.save_sharded_checkpoint(config.run_dir, step, model, optimizer, scheduler, state,
                                            config.keep_checkpoints, info)
        log.say(f"saved {path}")
        return
    if info.is_main:
        path = ckpt.save_checkpoint(config.run_dir, step, model, optimizer, scheduler, state, config.keep_checkpoints,
                                    average)
        log.say(f"saved {path}")
    barrier(info)


def log_shards(model, optimizer, info: DistInfo, log) -> None:
    """How many trainable weights and AdamW elements each rank stores (its local shards under FSDP),
    measured after the first step, when AdamW's state exists."""
    if not info.enabled:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    moments = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor) and v.ndim]
    local = torch.zeros(info.world_size, 5, dtype=torch.float64)
    local[info.rank] = torch.tensor([local_numel(params), local_numel(moments), local_numel(frozen), *memory_mb(info)],
                                    dtype=torch.float64)
    counts = all_reduce_sum(local, info).long().tolist()
    log.say("per-rank shards: " + json.dumps({
        "trainable_total": sum(p.numel() for p in params), "trainable": [c[0] for c in counts],
        "optimizer": [c[1] for c in counts], "frozen_total": sum(p.numel() for p in frozen),
        "frozen": [c[2] for c in counts], "memory_mb": [c[3] for c in counts], "peak_memory_mb": [c[4] for c in counts]}))


def memory_mb(info: DistInfo) -> tuple[float, float]:
    """(now, peak) memory of this process in MiB: CUDA allocations on a GPU, resident set on a CPU."""
    if info.device.type == "cuda":
        return torch.cuda.memory_allocated(info.device) / 2**20, torch.cuda.max_memory_allocated(info.device) / 2**20
    import resource

    now = 0.0
    with open("/proc/self/status") as status:  # Linux; elsewhere only the peak is known
        for line in status:
            if line.startswith("VmRSS:"):
                now = int(line.split()[1]) / 1024
    return now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- outputs
class RunLog:
    """Rank 0's outputs: console lines (through tqdm), train.log, metrics.jsonl and TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.writer = self.log_file = self.metrics_file = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            self.log_file = open(self.run_dir / "train.log", "a", encoding="utf-8")
            self.metrics_file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        tqdm.write(message)
        self.log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        self.log_file.flush()

    def data_stats(self, data) -> None:
        """Bad records were skipped by the data layer; say how many, here and in TensorBoard."""
        self.say(f"data: {len(data)} records ({data.description()}); {data.stats_summary()}")
        if self.enabled:
            skipped = data.stats.get("skipped", {})
            self.writer.add_text("data/stats", data.stats_summary(), 0)
            self.writer.add_scalar("data/records", len(data), 0)
            self.writer.add_scalar("data/skipped", sum(skipped.values()), 0)
            for reason, count in skipped.items():
                self.writer.add_scalar(f"data/skipped_{reason}", count, 0)

    def progress(self, config: TrainConfig, step: int):
        from tqdm.auto import tqdm

        return tqdm(total=config.max_steps, initial=step, desc="train", unit="step",
                    disable=not (self.enabled and config.progress), dynamic_ncols=True)

    def step(self, metrics: dict, bar, every: int) -> None:
        if not self.enabled:
            return
        step = metrics["step"]
        for key in ("loss", "text_loss", "image_loss", "lr", "grad_norm", "tokens_per_s", "step_time",
                    "packing_efficiency", "flops_per_s", "mfu"):
            if key in metrics:
                self.writer.add_scalar(f"train/{key}", metrics[key], step)
        self.metrics_file.write(json.dumps(metrics) + "\n")
        self.metrics_file.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", text=f"{metrics['text_loss']:.3f}",
                        image=f"{metrics['image_loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
        if step % every == 0:
            self.say(f"step {step}: loss {metrics['loss']:.4f} text {metrics['text_loss']:.4f} image "
                     f"{metrics['image_loss']:.4f} lr {metrics['lr']:.2e} grad {metrics['grad_norm']:.2f} "
                     f"{metrics['tokens_per_s']:.0f} tok/s {metrics['flops_per_s'] / 1e12:.3g} TFLOP/s"
                     + (f" MFU {metrics['mfu']:.1%}" if "mfu" in metrics else "")
                     + f", {100 * metrics['packing_efficiency']:.0f}% of positions real")

    def probes(self, values: dict, step: int, warmup_steps: int = 0) -> dict:
        """Whether the image path listens to its prompt (lmfusion.model.probes), in the log and TensorBoard."""
        if not self.enabled:
            return {}
        for key, value in values.items():
            self.writer.add_scalar(f"probes/{key}", value, step)
        gains = " ".join(f"{band} {values[f'prompt_gain/{band}']:+.3f}" for band in ("low", "mid", "high"))
        self.say(f"step {step}: prompt gain {gains}; stack dependence {values['stack_dependence']:.3f}")
        warning = bypass_warning(values, step, warmup_steps)
        if warning is not None:
            self.say(warning)
        return {f"probe/{k}": v for k, v in values.items()}

    def close(self) -> None:
        for handle in (self.writer, self.log_file, self.metrics_file):
            if handle is not None:
                handle.close()
        self.writer = self.log_file = self.metrics_file = None
