"""LMFusionConfig: everything needed to rebuild an LMFusion model around its base LM."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .diffusion import DEFAULT_GUIDANCE_SCALE, DEFAULT_IMAGE_GUIDANCE_SCALE, check_objective

# How much of the decoder layer gets a separate image copy (paper section 5.1 ablation):
#   lmfusion  "deep separation": norms, Q/K/V, O and FFN per modality; text frozen (the paper's method)
#   ffn_only  "shallow separation": only the FFN (and its norm) per modality; attention shared, frozen
#   dense     "no separation": one set of weights for both modalities, all trained
#   scratch   same architecture as lmfusion, random init, everything trained (Transfusion baseline)
MODES = ("lmfusion", "ffn_only", "dense", "scratch")
READOUTS = ("standardize", "plain")
# Attention kernels: "sdpa" with a dense boolean mask (CPU, short sequences, cached sampling) or
# "flex", torch's flex_attention with a block-sparse BlockMask (long packed rows on a GPU).
ATTENTION = ("sdpa", "flex")
# What tells a patch token where in its image it sits: "none" (the papers: only the LM's 1-D RoPE
# position, so a patch knows its place relative to its BOI) or "learned" (plus a learned 2-D table,
# one vector per patch, added to every image's tokens as DiT and BAGEL do). The table lets a target
# patch find the source patch at the same place by content, which an edit needs: with RoPE alone
# their distance changes with the instruction's length. Zero at init, so it changes nothing at step 0.
IMAGE_POSITIONS = ("none", "learned")
# What else an image's U-Net down block reads besides its own (noisy) latent: "none" (the papers)
# or "previous": the clean latent of the image before it in the same sequence (an edit's source, a
# chat's first image), concatenated on channels, zeros when there is none. This is InstructPix2Pix's
# conditioning: target cell i is computed from source cell i, so keeping the scene needs no match
# across the sequence. Its extra input weights start at zero, so a model gains it without a change.
# "residual" (flow only) reads the same input and also denoises the image *relative to* that latent:
# the blocks see the noised difference (image - previous) and predict its velocity, which the model
# turns back into the image's, so an unchanged region is a zero to keep, not content to redraw. With
# no previous image (or one dropped for guidance) it is zero and the model is "previous" exactly.
# Measured against "previous" from one start: more kept, fewer edits made, joint unchanged
# (benchmarks/results/edit.md), so the edit preset keeps "previous".
IMAGE_CONDITIONS = ("none", "previous", "residual")

# A U-Net small enough for tests and smoke runs (seconds on a CPU); the one place these live.
TINY_UNET = dict(unet_channels=32, unet_norm_groups=8, time_embed_dim=32)


@dataclass
class LMFusionConfig:
    base_model: str = "smollm2-135m"
    base_model_hash: str | None = None
    mode: str = "lmfusion"
    # "text": image modules start as copies of the text weights (paper); "random": fresh init.
    image_init: str = "text"

    # Image path: codec latents -> U-Net down block -> patches; patches -> up block -> noise.
    codec: dict = field(default_factory=lambda: {"name": "pixel"})
    image_size: int = 64
    # The latent shape follows from the codec and image_size (pixel: 3 x image_size; taef2: 32 x
    # image_size / 8); None derives it. A diffusers VAE's shape is known once it is loaded, so
    # there both must be given (lmfusion.training.build_model takes them from the loaded codec).
    latent_channels: int | None = None
    latent_size: int | None = None
    patch_size: int = 8  # latent cells per patch side; the down block downsamples by this factor
    # How the up block reads the transformer's final image states: "standardize" (per-dimension
    # running mean/std, so the few massive constant dims the copied layers carry cannot swamp the
    # rest; docs/image_learning.md) or "plain" (the final norm's output as it is).
    readout: str = "standardize"
    unet_channels: int = 128
    unet_norm_groups: int = 32
    time_embed_dim: int = 256
    image_position_embedding: str = "none"  # IMAGE_POSITIONS
    image_condition: str = "none"  # IMAGE_CONDITIONS
    # Training only: the share of images whose up block gets the down block's skips zeroed, so it
    # must denoise from the transformer's states alone. Guards against the U-Net failure mode of
    # docs/image_learning.md (the skips do the denoising and the prompt is bypassed), which one
    # quickstart training seed fell into. 0 = always use them (the paper). Sampling always uses them.
    skip_dropout: float = 0.0

    # Image objective (lmfusion.diffusion): "flow" (rectified flow, the default: measured to make the
    # model read its prompt, docs/image_learning.md) or the paper's DDPM "eps" (Transfusion: cosine
    # schedule, 1,000 steps), or "v". timestep_sampling "" = uniform (the shift then moves it for flow).
    objective: str = "flow"
    timestep_sampling: str = ""
    # flow: SD3's shift of the noise levels; > 1 trains (and samples) more at high noise, where only
    # the prompt says what the image holds (10: measured to make the prompt matter, docs/image_learning.md)
    timestep_shift: float = 10.0
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"  # eps / v only
    diffusion_loss_weight: float = 5.0
    # Training only: > 0 adds max(0, boi_margin + logit_BOI - logsumexp(other logits)) to the token
    # loss at every text target that is not BOI, so BOI stays this many nats below half the mass
    # where the reply is text (model/draw_margin.py). 0 = off (plain cross-entropy).
    boi_margin: float = 0.0

    # Training forwards without a KV cache use this kernel; cached decoding always uses sdpa.
    attention: str = "sdpa"

    boi_token: str = "<|begin_of_image|>"
    eoi_token: str = "<|end_of_image|>"

    # The classifier-free guidance scale this model samples at when a caller names none (as a
    # transformers GenerationConfig carries a model's decoding defaults): the best one measured for
    # its recipe, set by the preset (the quickstart's: 5). None: DEFAULT_GUIDANCE_SCALE, the papers' 1.6.
    guidance_scale: float | None = None
    # The same for edits' guidance toward the source image (s_I); None: DEFAULT_IMAGE_GUIDANCE_SCALE, 1.5.
    image_guidance_scale: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.image_init not in ("text", "random"):
            raise ValueError(f"image_init must be 'text' or 'random', got {self.image_init!r}")
        self._settle_latent_shape()
        check_objective(self.objective, self.timestep_sampling or None)
        if self.objective != "flow" and self.timestep_shift != 1.0:
            self.timestep_shift = 1.0  # the shift is a flow setting; DDPM schedules have none
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        for name in ("guidance_scale", "image_guidance_scale"):
            if getattr(self, name) is not None and not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 (1 = none) or null, got {getattr(self, name)}")
        if self.image_position_embedding not in IMAGE_POSITIONS:
            raise ValueError(f"image_position_embedding must be one of {IMAGE_POSITIONS}, "
                             f"got {self.image_position_embedding!r}")
        if self.image_condition not in IMAGE_CONDITIONS:
            raise ValueError(f"image_condition must be one of {IMAGE_CONDITIONS}, got {self.image_condition!r}")
        if self.image_condition == "residual" and self.objective != "flow":
            raise ValueError(f"image_condition 'residual' needs objective 'flow', got {self.objective!r}")
        if self.readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {self.readout!r}")
        if not self.boi_margin >= 0:
            raise ValueError(f"boi_margin must be >= 0 (0 = off), got {self.boi_margin}")
        if not 0.0 <= self.skip_dropout < 1.0:
            raise ValueError(f"skip_dropout must be in [0, 1), got {self.skip_dropout}")
        if self.latent_size % self.patch_size:
            raise ValueError(f"latent_size {self.latent_size} is not divisible by patch_size {self.patch_size}")
        if self.patch_size & (self.patch_size - 1):
            raise ValueError(f"patch_size must be a power of two, got {self.patch_size}")
        if self.readout == "standardize" and self.tokens_per_image == 1:
            # Its batch statistics would come from a single value per dim for a one-image batch.
            raise ValueError(f"readout 'standardize' needs more than one token per image, but patch_size "
                             f"{self.patch_size} covers the whole {self.latent_size}x{self.latent_size} latent: "
                             "use a smaller patch_size or readout 'plain'")

    def _settle_latent_shape(self) -> None:
        """Derive latent_channels / latent_size from the codec, or check given ones against it."""
        from .codecs.registry import CODEC_CLASSES

        name = self.codec.get("name") if isinstance(self.codec, dict) else None
        codec_class = CODEC_CLASSES.get(name)
        channels = getattr(codec_class, "latent_channels", None)  # class-level for fixed codecs only
        factor = getattr(codec_class, "downsample_factor", None)
        if channels is None or factor is None:
            if self.latent_channels is None or self.latent_size is None:
                raise ValueError(f"codec {name!r}: set latent_channels and latent_size (the latent shape of a "
                                 f"{self.image_size} px image; it depends on the loaded codec)")
            return
        size = self.image_size // factor
        for field_name, derived in (("latent_channels", channels), ("latent_size", size)):
            given = getattr(self, field_name)
            if given is None:
                setattr(self, field_name, derived)
            elif given != derived:
                raise ValueError(
                    f"codec {name!r} at image_size {self.image_size} gives latents of {channels} x {size} x {size}, "
                    f"but {field_name}={given}: set {field_name}={derived} (or leave it out to derive it)")

    @property
    def patches_per_side(self) -> int:
        return self.latent_size // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        return self.patches_per_side**2

    @property
    def reads_previous_image(self) -> bool:
        """Whether an image's down block also reads the clean latent of the image before it."""
        return self.image_condition in ("previous", "residual")

    @property
    def default_guidance_scale(self) -> float:
        """The guidance scale samplers use when none is given."""
        return DEFAULT_GUIDANCE_SCALE if self.guidance_scale is None else self.guidance_scale

    @property
    def default_image_guidance_scale(self) -> float:
        """The guidance toward the source image that edits use when none is given."""
        return DEFAULT_IMAGE_GUIDANCE_SCALE if self.image_guidance_scale is None else self.image_guidance_scale

    @property
    def text_frozen(self) -> bool:
        return self.mode in ("lmfusion", "ffn_only")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LMFusionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown LMFusionConfig fields: {sorted(unknown)}")
        # Configs saved before these fields existed: the paper's eps objective, a plain readout.
        return cls(**{"objective": "eps", "readout": "plain", "timestep_shift": 1.0, **data})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LMFusionConfig":
        """The saved config; a malformed or foreign file raises CheckpointError naming it."""
        from .integrity import CheckpointError, read_json

        data = read_json(path)
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a JSON object of LMFusionConfig fields, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: not a valid LMFusion config ({error})") from None
