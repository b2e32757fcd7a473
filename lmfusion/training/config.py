"""TrainConfig: every knob of a training run, in one flat dataclass.

A run's config is resolved in layers, later ones winning: the dataclass defaults, a named
preset, a YAML file, then command-line flags. The resolved config is written to the run folder
(`config.yaml`), so a run can always be re-created and resumed from what is on disk. Unknown keys
are an error rather than silently ignored: a misspelt `lr_warmup` must not train with defaults.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ATTENTION, TINY_UNET, LMFusionConfig

PRECISIONS = ("fp32", "bf16", "auto")
TASKS = ("auto", "caption", "edit", "chat")
PARALLEL = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    # ---- run
    name: str = "run"
    runs_dir: str = "runs"
    seed: int = 0

    # ---- model (see LMFusionConfig; `model` holds any further LMFusionConfig field)
    base_model: str = "smollm2-135m"
    mode: str = "lmfusion"
    image_size: int = 64
    patch_size: int = 8
    codec: dict = field(default_factory=lambda: {"name": "pixel"})
    model: dict = field(default_factory=dict)

    # ---- data
    data: str = "data/shapes"
    generate_shapes: int = 0  # > 0: create a shapes dataset of this many images at `data` if missing
    shapes_two_object_prob: float = 0.5  # share of generated shapes scenes with two objects (else one)
    generate_shapes_edits: int = 0  # > 0: create a shapes editing set of this many triples at `data` if missing
    task: str = "auto"  # "caption" | "edit" | "chat" | "auto" (edit / chat when `data` has an edits.jsonl / chat.jsonl)
    edit_dropout: float = 0.05  # editing: instruction, source or both dropped, this share each
    generate_shapes_chat: int = 0  # > 0: create a shapes chat set of this many conversations at `data` if missing
    chat_edit_data: str = ""  # task chat: an editing set (shapes-edits layout) mixed into the conversations
    chat_edit_ratio: float = 0.0  # task chat: share of examples that are edits from chat_edit_data
    chat_clean_stop_ratio: float = 0.0  # task chat: share of one-image chats whose image enters clean (no loss)
    init_from: str = ""  # a run / checkpoint / model folder whose adapter weights start the run
    max_text_tokens: int = 64
    image_first_ratio: float = 0.2  # paper: caption before image 80%, image before caption 20%
    caption_dropout: float = 0.1  # caption-first examples whose caption becomes "" (CFG unconditional)
    text_only_ratio: float = 0.0  # examples that are plain text (no image)
    text_data: str = ""  # text file, one document per line, for text-only examples ("" = captions)
    latent_cache: str = ""  # folder of pre-encoded latents ("" = <LMFUSION_CACHE>/latents, "none" = off)
    pack_length: int = 0  # > 0: concatenate each micro-batch's examples into rows of this many tokens
    attention: str = "sdpa"  # "flex": flex_attention with a BlockMask (GPU training; see LMFusionConfig)
    # Latent datasets above this many MiB (fp32) are encoded to shards in latent_cache and streamed
    # from disk; smaller ones are held in memory, the fastest path.
    memory_cache_limit_mb: float = 4096.0
    data_workers: int = 0  # DataLoader processes building the next steps' batches (0 = in the training process)

    # ---- optimisation
    max_steps: int = 1000
    batch_size: int = 8  # examples per optimizer step, over all processes
    micro_batch_size: int = 0  # examples per forward pass and process (0 = batch_size / world size)
    lr: float = 1e-4  # the copied image layers (paper: eta_img = 1e-4)
    min_lr: float = 1.5e-5  # cosine decay floor
    fresh_lr_scale: float = 1.0  # lr multiplier for fresh modules (U-Net in/out, timestep MLP, BOI/EOI rows)
    warmup_steps: int = 100
    weight_decay: float = 0.1  # matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    ema_decay: float = 0.0  # > 0: keep a moving average of the trainable weights (checkpoint's ema/); 0 = off
    precision: str = "fp32"  # "bf16": bf16 autocast (weights and optimizer stay fp32); "auto": bf16 where native
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each fused decoder layer (after checkpointing, before FSDP)
    skip_frozen_context: bool = False  # no autograd graph for text that nothing trainable precedes
    parallel: str = "ddp"  # with several processes: "ddp" replicates, "fsdp" shards (FSDP2)
    threads: int = 0  # torch intra-op threads (0 = torch's default)

    # ---- logging, checkpoints, samples
    log_every: int = 10
    checkpoint_every: int = 100  # also always at the last step
    keep_checkpoints: int = 3
    sample_every: int = 0  # 0 disables sample grids
    sample_prompts: list = field(
        default_factory=lambda: ["a small red circle", "a large blue square on the left", "a green triangle above a yellow circle"]
    )
    sample_steps: int = 50
    # Not the samplers' DEFAULT_GUIDANCE_SCALE: short runs draw clearer grids at 3 (benchmarks/results/quickstart.md).
    sample_guidance_scale: float = 3.0
    # Saved with the model (LMFusionConfig.guidance_scale): the guidance `lmfusion generate`, chat, edit
    # and serve use when no --guidance-scale is given. None: the samplers' DEFAULT_GUIDANCE_SCALE.
    guidance_scale: float | None = None
    image_guidance_scale: float | None = None  # the same for edits' guidance toward the source (None: 1.5)
    probe_every: int = 50  # conditioning probes (prompt gain, stack dependence; lmfusion.model.probes); 0 = off
    probe_images: int = 16
    progress: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(f.name, str(f.type), getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.parallel in PARALLEL, f"parallel must be one of {PARALLEL}, got {self.parallel!r}"),
            (self.attention in ATTENTION, f"attention must be one of {ATTENTION}, got {self.attention!r}"),
            (self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}"),
            (0.0 <= self.chat_edit_ratio < 1.0 and (self.chat_edit_ratio == 0 or bool(self.chat_edit_data)),
             f"chat_edit_ratio must be in [0, 1) and needs chat_edit_data, got {self.chat_edit_ratio} and "
             f"{self.chat_edit_data!r}"),
            (self.generate_shapes_chat >= 0 and not (self.generate_shapes_chat and self.generate_shapes),
             "generate_shapes_chat must be >= 0, and not given together with generate_shapes (one dataset at `data`)"),
            (self.chat_edit_ratio == 0 or self.task == "chat", "chat_edit_ratio mixes edits into task: chat only"),
            (0.0 <= self.chat_clean_stop_ratio <= 1.0,
             f"chat_clean_stop_ratio must be in [0, 1], got {self.chat_clean_stop_ratio}"),
            (0.0 <= self.edit_dropout <= 1 / 3, f"edit_dropout must be in [0, 1/3] (three cases), got {self.edit_dropout}"),
            (self.generate_shapes_edits >= 0 and not (self.generate_shapes_edits and self.generate_shapes),
             "generate_shapes_edits must be >= 0, and not given together with generate_shapes (one dataset at `data`)"),
            (self.pack_length >= 0, f"pack_length must be >= 0 (0 = no packing), got {self.pack_length}"),
            (self.max_steps > 0, f"max_steps must be positive, got {self.max_steps}"),
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (self.micro_batch_size >= 0, f"micro_batch_size must be >= 0, got {self.micro_batch_size}"),
            (0 <= self.warmup_steps, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (0 <= self.min_lr <= self.lr, f"need 0 <= min_lr <= lr, got min_lr={self.min_lr} lr={self.lr}"),
            (0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1) (0 = no average), got {self.ema_decay}"),
            (self.fresh_lr_scale > 0, f"fresh_lr_scale must be positive, got {self.fresh_lr_scale}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.checkpoint_every >= 0 and self.log_every > 0, "checkpoint_every must be >= 0 and log_every > 0"),
            (self.memory_cache_limit_mb >= 0, f"memory_cache_limit_mb must be >= 0, got {self.memory_cache_limit_mb}"),
            (self.data_workers >= 0, f"data_workers must be >= 0, got {self.data_workers}"),
            (self.probe_every >= 0 and self.probe_images >= 1, "probe_every must be >= 0 and probe_images >= 1"),
            # checked here too, so a bad value fails at start-up rather than after encoding the data
            (all(s is None or s >= 0 for s in (self.guidance_scale, self.image_guidance_scale)),
             f"guidance_scale and image_guidance_scale must be >= 0 (1 = none) or null, got "
             f"{self.guidance_scale} and {self.image_guidance_scale}"),
            (isinstance(self.codec, dict) and "name" in self.codec, f"codec must be a mapping with a 'name', got {self.codec!r}"),
            (bool(self.name) and "/" not in self.name, f"name must be a plain folder name, got {self.name!r}"),
        ]
        for ratio in ("image_first_ratio", "caption_dropout", "text_only_ratio", "shapes_two_object_prob"):
            value = getattr(self, ratio)
            checks.append((0.0 <= value <= 1.0, f"{ratio} must be in [0, 1], got {value}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        known = {f.name for f in dataclasses.fields(LMFusionConfig)}
        reserved = {"base_model", "base_model_hash", "mode", "attention", "image_size", "patch_size", "codec", "latent_channels", "latent_size"}
        bad = sorted(set(self.model) - (known - reserved))
        if bad:
            raise ValueError(f"unknown or reserved keys under model: {bad} (allowed: {sorted(known - reserved)})")

    # ------------------------------------------------------------------ derived values
    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def split_batch(self, world_size: int) -> tuple[int, int]:
        """(micro_batch_size, accumulation steps) so that micro x accum x world == batch_size."""
        micro = self.micro_batch_size or max(1, self.batch_size // world_size)
        if self.batch_size % (micro * world_size):
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size {micro} x {world_size} processes"
            )
        return micro, self.batch_size // (micro * world_size)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        return cls(**check_keys(data))

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **check_keys(changes))


def coerce(name: str, kind: str, value: Any) -> Any:
    """Check a value against its field type; accept the obvious spellings ("3e-4", 1 for 1.0)."""
    try:
        if kind == "float | None":  # null in YAML, "none" / "null" on the command line
            if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
                return None
        if kind in ("float", "float | None") and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if kind == "int" and not isinstance(value, bool):
            if isinstance(value, (int, str)) or (isinstance(value, float) and value.is_integer()):
                return int(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
        if kind == "str" and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if kind == "dict" and isinstance(value, dict):
            return dict(value)
        if kind == "list" and isinstance(value, (list, tuple)):
            return [str(v) for v in value]
    except ValueError:
        pass
    raise ValueError(f"{name} must be a {kind}, got {value!r}")


# Keys renamed since runs first saved their config.yaml: old name -> new name. A run folder or a
# YAML file written with the old name still loads (and resumes) under the new one.
RENAMED_KEYS = {"sample_cfg": "sample_guidance_scale"}


def check_keys(data: dict) -> dict:
    """`data` with renamed keys under their new names; unknown keys are a ValueError."""
    data = dict(data)
    for old, new in RENAMED_KEYS.items():
        if old in data:
            if new in data:
                raise ValueError(f"config gives both {old!r} and its new name {new!r}; keep only {new!r}")
            data[new] = data.pop(old)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown training config keys: {unknown}; known keys: {sorted(known)}")
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return check_keys(data)


# --------------------------------------------------------------------------- presets

PRESETS: dict[str, dict] = {
    # The README's main job: SmolLM2-135M (frozen) + image copies of its 30 layers, the shipped
    # TAEF2 codec (64 px -> 8x8x32 latents, 2x2 patches: 16 tokens per image), single-object
    # shapes, the flow objective with the high-noise shift and the standardising readout. 13-34
    # minutes on 2 CPU cores; on AVX2 machines it ends in a model that draws the prompted colour on
    # white and captions colour, shape and size, but other CPUs (other float rounding) and other
    # training seeds can end far worse: one Zen 4 run learnt no colour (benchmarks/results/quickstart.md).
    "quickstart": dict(
        name="quickstart",
        base_model="smollm2-135m",
        image_size=64,
        patch_size=2,
        codec={"name": "taef2"},
        # U-Net blocks twice the default width: paired over three training seeds x two held-out seeds,
        # generated shape 0.64 -> 0.75 (higher in 6 of 6 pairs) and all correct 0.29 -> 0.38 (5 of 6)
        # for ~1.05x the training time (benchmarks/results/quickstart.md, "A wider U-Net").
        model={"unet_channels": 256},
        data="data/shapes_single",
        generate_shapes=3000,
        shapes_two_object_prob=0.0,
        image_first_ratio=0.38,  # paper 0.2; 300-odd steps need more image-first examples to caption
        max_steps=360,
        batch_size=16,
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=20,
        threads=2,
        log_every=25,
        checkpoint_every=100,
        keep_checkpoints=2,
        sample_every=120,
        sample_steps=20,
        sample_prompts=["a small red circle", "a large blue square", "a large green triangle", "a small yellow square"],
        # The best of guidance 1 / 3 / 5 / 8 for all-correct on two held-out seeds (benchmarks/results/quickstart.md).
        guidance_scale=5.0,
        probe_every=100,
        # bf16 where it is native (AVX-512-BF16 / AMX CPUs, GPUs): 0.66x the step time on 2 quiet Zen 4 cores,
        # held-out figures within the fp32 runs' spread (benchmarks/results/quickstart.md); fp32 on AVX2.
        precision="auto",
    ),
    # Tiny images and U-Net for smoke tests; pair it with a tiny base LM
    # (lmfusion.testing.save_tiny_base) via --base-model for runs of a few seconds.
    "tiny": dict(
        name="tiny",
        image_size=16,
        patch_size=8,
        model=dict(TINY_UNET),
        batch_size=4,
        max_steps=20,
        warmup_steps=2,
        lr=1e-3,
        min_lr=1e-4,
        log_every=1,
        checkpoint_every=10,
    ),
}


# About an hour on 2 CPU cores (about 6 minutes on an H200, benchmarks/results/demo.md): the
# quickstart's recipe on scenes with one or two objects (relations such as "above", positions,
# counts), 10,000 images, ~4x the steps. Derived from the quickstart so the two cannot drift apart.
PRESETS["demo"] = dict(
    PRESETS["quickstart"],
    name="demo",
    precision="fp32",  # what it was measured at (CPU and H200); "auto" is measured for the quickstart only
    model={},  # the default U-Net width, as measured; the quickstart's wider one is not measured here
    data="data/shapes",
    generate_shapes=10000,
    shapes_two_object_prob=0.5,
    image_first_ratio=0.25,
    guidance_scale=3.0,  # of the two measured (1, 3), 3 raised every figure but count (benchmarks/results/demo.md)
    max_steps=1400,
    warmup_steps=50,
    log_every=50,
    checkpoint_every=200,
    sample_every=200,
    sample_prompts=["a small red circle", "a large blue square on the left",
                    "a small green triangle above a large yellow circle",
                    "a small purple square to the left of a large orange circle"],
)

# LLaVAFusion (LMFusion §5.3) at toy scale: the quickstart's recipe on top of a frozen VLM instead
# of a text LM. The base is the small LLaVA that `lmfusion vlm build` trains here (SmolLM2-135M +
# a SigLIP tower trained from scratch, docs/tiny_llava.md); any supported LLaVA-family folder works
# (--base-model). The VLM keeps all understanding (its own vision tower reads images), so every
# example trains generation: image_first_ratio 0. See docs/llavafusion.md.
PRESETS["llavafusion"] = dict(
    PRESETS["quickstart"],
    name="llavafusion",
    precision="fp32",  # what it was measured at; "auto" is measured for the quickstart only
    model={},  # the default U-Net width, as measured; the quickstart's wider one is not measured here
    base_model="runs/tiny_llava",
    image_first_ratio=0.0,
    guidance_scale=None,  # not swept for this base: the samplers' default
)

# The paper's recipe at full size (LMFusion §4.1, Transfusion §4): Llama-3-8B, 256 px images as
# sd-vae-ft-mse latents, 2x2 patches = 256 tokens per image, 4,096-token packs, AdamW (0.9, 0.95,
# 1e-8), lr 1e-4 with 4,000 warm-up steps and cosine decay to 1.5e-5, weight decay 0.1, clip 1.0,
# 80% caption-first, lambda 5. `data` must be given (--data): a latent-shard folder from
# `lmfusion data encode` or any supported image-caption source. See docs/paper_scale.md.
#  * The paper's "32x32x8" latents: sd-vae-ft-mse (which LMFusion's footnote names) has 4 latent
#    channels; its encoder's 8 raw channels are the mean and log-variance. We take the 4-channel
#    mean (DiffusersVAECodec), i.e. 4 x 32 x 32 at 256 px; Transfusion's own 8-channel VAE is not released.
#  * U-Net down + up blocks at ~0.27B parameters: unet_channels 1472 (0.26B with the timestep MLP at
#    hidden 4096, counted by `lmfusion train --preset paper --dry-run`).
#  * The objective is flow matching with the high-noise shift, this project's measured default
#    (docs/image_learning.md), not the paper's DDPM eps: `--model '{objective: eps}'` gives the paper's.
#  * Batch: 864 examples of ~290 tokens = ~250K tokens per step (the paper's 250K), as 8 ranks x 12
#    examples per 4,096-token pack x 9 accumulation steps; 250K steps as in Transfusion (LMFusion
#    gives none).
PRESETS["paper"] = dict(
    name="paper",
    base_model="meta-llama/Meta-Llama-3-8B",
    image_size=256,
    patch_size=2,
    codec={"name": "diffusers", "path": "stabilityai/sd-vae-ft-mse"},
    model=dict(unet_channels=1472, unet_norm_groups=32, time_embed_dim=1024),
    data="data/train",
    image_first_ratio=0.2,
    caption_dropout=0.1,
    max_steps=250_000,
    batch_size=864,
    micro_batch_size=12,
    lr=1e-4,
    min_lr=1.5e-5,
    warmup_steps=4000,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    eps=1e-8,
    grad_clip=1.0,
    precision="bf16",
    gradient_checkpointing=True,
    parallel="fsdp",
    pack_length=4096,
    attention="flex",
    compile=True,
    log_every=10,
    checkpoint_every=1000,
    sample_every=5000,
    probe_every=1000,
)


# Editing (issue 16, LMFusion §5.2 / Transfusion §4.5): the quickstart's model and recipe, fine-tuned
# from a quickstart run on 8,000 shapes editing triples ([BOI source EOI] instruction [BOI target EOI],
# InstructPix2Pix's 5% dropout of instruction, source and both). An edit example holds two images,
# a quickstart one holds one. The target's down block also reads the source's latent
# (image_condition "previous", InstructPix2Pix's channel concat; its weights start at zero, so the
# quickstart start gains it unchanged): at image guidance 1 it kept the rest of the scene in 0.23 of
# held-out edits against 0.04 for a paired run without it from the same start (0.11 and 0.02 earlier),
# and its best joint is 0.23 (image guidance 1.5, success 0.63); continued for 900 more steps it
# reached 0.38, still short of the 0.6 (benchmarks/results/edit.md).
# 600 steps: 43 min 53 s on 2 AVX2 cores (Zen 3, the preset before the source input); 37 min 43 s of
# steps at 2 threads on a Zen 4 AVX-512 VM. `--init-from ''` trains from fresh image modules.
# All measured from 128-channel quickstart starts; since 2026-12-08 the preset follows the
# quickstart's 256-channel U-Net (init_from needs the same width), not yet measured for editing.
PRESETS["edit"] = dict(
    PRESETS["quickstart"],
    name="edit",
    precision="fp32",  # what its figures were measured at; "auto" is measured for the quickstart only
    data="data/shapes_edits",
    generate_shapes=0,
    generate_shapes_edits=8000,
    task="edit",
    edit_dropout=0.05,
    init_from="runs/quickstart",
    image_first_ratio=0.0,
    # The start's U-Net (init_from loads its weights) plus the previous image's input.
    model={**PRESETS["quickstart"]["model"], "image_condition": "previous"},
    # Saved with the model: text guidance 3 (the scale it was measured at; 6 at image guidance 1 was
    # worse) and image guidance 1.5, the best joint of 1 / 1.5 / 2.5 on held-out edits.
    guidance_scale=3.0,
    image_guidance_scale=1.5,
    max_steps=600,
    warmup_steps=20,
    lr=5e-4,
    min_lr=5e-5,
    sample_every=200,
    sample_prompts=[],
    probe_every=0,  # the probes read caption data
)


# Editing plus chat (issue 16 items 3-4): the edit preset's model and recipe on shapes-chat
# conversations (3,000: one-image, two-image and text-only requests in turn; the text replies are
# SmolLM2-135M-Instruct's own greedy ones, generated once at data time), half of the examples edits
# from its own 3,000 shapes-edits triples (200 steps see ~1,600 of them). It starts from a quickstart
# run (init_from), so drawing and captioning are there and the run learns when to draw. Half the
# one-image chats show their image clean (chat_clean_stop_ratio), so the stop after an image is also
# learnt in the clean context the sampler draws in. Measured (benchmarks/results/chat.md): ~50 min of
# training plus ~10 min of data on a Zen 1 AVX2 VM; held out (a Zen 4 pair from one start), BOI F1
# 1.00, no false draws, text replies identical to the base, image count right 0.92 (0.61 without
# the clean stops).
PRESETS["instruct"] = dict(
    PRESETS["edit"],
    name="instruct",
    # The model measured for chat, kept: no previous-image input (the edit preset's since 2026-12-07,
    # not measured on chat), and the image guidance its edits were scored at; the start's U-Net.
    model=dict(PRESETS["quickstart"]["model"]),
    image_guidance_scale=2.5,
    data="data/shapes_chat",
    generate_shapes_chat=3000,
    task="chat",
    chat_edit_data="data/shapes_edits_3k",
    generate_shapes_edits=3000,  # at chat_edit_data, when a chat run asks for it
    chat_edit_ratio=0.5,
    chat_clean_stop_ratio=0.5,
    max_steps=200,
    # Rows packed, not padded: chats, replies and edits differ in length (65% of padded positions
    # real, 78-85% packed); 0.83x the step time, same losses and gradients (benchmarks/results/chat.md).
    pack_length=256,
    sample_every=0,  # chat runs write no sample grid; `lmfusion eval --task chat` measures them
)


def load_config(preset: str | None = None, path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults <- preset <- YAML file <- overrides (flags).

    `model` (LMFusionConfig fields) is merged key by key rather than replaced, so that
    `--preset paper --model '{objective: eps}'` keeps the preset's U-Net size.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    values: dict = {}
    for layer in (PRESETS.get(preset, {}), read_yaml(path) if path is not None else {}, overrides or {}):
        model = values.get("model")
        values.update(layer)
        if isinstance(model, dict) and isinstance(layer.get("model"), dict):
            values["model"] = {**model, **layer["model"]}
    return TrainConfig.from_dict(values)


def parse_value(text: str) -> Any:
    """A command-line value as YAML (`3e-4`, `true`, `{name: taef2}`), else the raw string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# Fields a resumed run may change: they do not alter what the next optimizer step computes
# (max_steps does change the cosine schedule; that is allowed, to extend a run, and announced).
RESUMABLE_CHANGES = {"max_steps", "log_every", "checkpoint_every", "keep_checkpoints", "sample_every",
                     "sample_prompts", "sample_steps", "sample_guidance_scale", "guidance_scale", "image_guidance_scale", "progress", "probe_every", "probe_images", "threads", "latent_cache",
                     "runs_dir", "generate_shapes", "generate_shapes_edits", "generate_shapes_chat", "data_workers",
                     # the starting weights: a resumed run continues from its own checkpoint instead
                     "init_from",
                     # how a step is laid out and computed, not what it computes (same losses, same gradients)
                     "pack_length", "attention", "skip_frozen_context"}
# Not resumable: memory_cache_limit_mb, because the in-memory path keeps fp32 latents and the shard
# path fp16 ones, so crossing the limit on resume would change what later steps compute.


def config_differences(old: TrainConfig, new: TrainConfig) -> list[str]:
    """Keys that differ between two configs and would make a resume train something else."""
    a, b = old.to_dict(), new.to_dict()
    return sorted(k for k in a if k not in RESUMABLE_CHANGES and json.dumps(a[k]) != json.dumps(b[k]))
