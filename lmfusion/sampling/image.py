"""Text-to-image: prompt + BOI, then noise patches denoised with a diffusers scheduler.

The prompt's K/V do not depend on the image (the mask is causal), so they are computed once
and every denoising step only runs the image tokens against the cache. Several prompts, n
images each, and the two classifier-free-guidance branches share ONE forward per step: all
their prefixes are left-padded into one batch. The unconditional branch is the prompt-less
layout the model was trained on for caption dropout: just BOI.

The sampler works in latents and never touches the codec. Functions that take or give pixels
(`generate_image`, `encode_images`, `decode_latents`) are handed the codec explicitly; its owner
is `LMFusionPipeline` (or, during training, the trainer that built it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..codecs.base import ImageCodec
from ..codecs.registry import latent_clip
from ..diffusion import check_sampler
from .guidance import PLAIN, GuidanceOptions
from .text import Context, encode_text, max_positions

# ---------------------------------------------------------------------- codec and image I/O
def encode_images(codec: ImageCodec, pixels: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> clean latents [N, C, h, w] (fp32) on `device` (the model's)."""
    with torch.no_grad():
        return codec.encode(pixels.to(device)).float().to(device)


def decode_latents(codec: ImageCodec, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images [N, 3, H, W] in [0, 1], on the CPU."""
    with torch.no_grad():
        return codec.decode(latents).float().clamp(0, 1).cpu()


def load_images(model, image) -> tuple[torch.Tensor, bool]:
    """A path / PIL image / tensor, or a list of them, as [N, 3, S, S]; and whether it was one."""
    from PIL import Image

    from ..data.images import load_rgb_image

    size = model.config.image_size
    single = not isinstance(image, (list, tuple)) and not (isinstance(image, torch.Tensor) and image.dim() == 4)
    items = [image] if single else list(image)
    if not items:
        raise ValueError("no images given")
    pixels = []
    for item in items:
        if isinstance(item, torch.Tensor):
            if tuple(item.shape) != (3, size, size):
                raise ValueError(f"image tensor has shape {tuple(item.shape)}; this model takes (3, {size}, {size}) in [0, 1]")
            pixels.append(item.float())
        elif isinstance(item, (str, bytes, Image.Image)) or hasattr(item, "__fspath__"):
            pixels.append(load_rgb_image(item, size))
        else:
            raise ValueError(f"cannot read an image from {type(item).__name__}")
    return torch.stack(pixels), single


# ---------------------------------------------------------------------- checks
def prompt_tokens(model, prompt: str, allow_empty: bool = False) -> list[int]:
    """Prompt ids + BOI, after the checks a user should hear about before any compute."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip() and not allow_empty:
        raise ValueError("prompt is empty (pass allow_empty=True for an unconditional image)")
    ids = encode_text(model, prompt) if prompt.strip() else []
    limit = max_prompt_tokens(model)
    if len(ids) > limit:
        raise ValueError(
            f"prompt is {len(ids)} tokens; at most {limit} fit (the base model's {max_positions(model)} positions "
            f"minus {model.config.tokens_per_image} image tokens and BOI/EOI)"
        )
    return ids + [model.boi_token_id]


def max_prompt_tokens(model) -> int:
    return max_positions(model) - model.config.tokens_per_image - 2


def resolve_guidance_scale(model, guidance_scale: float | None) -> float:
    """The scale asked for, or (None) the model's own default, saved in its config."""
    return model.config.default_guidance_scale if guidance_scale is None else guidance_scale


def check_strength(strength: float) -> None:
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1] (1 = start from pure noise), got {strength}")


def check_sampling_args(steps: int, guidance_scale: float | None, n: int = 1, scheduler: str | None = None,
                        objective: str | None = None) -> None:
    """guidance_scale None is valid: it stands for the model's default (resolve_guidance_scale)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if guidance_scale is not None and guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0 (1 = no guidance), got {guidance_scale}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    check_sampler(scheduler, objective)  # raises ValueError naming the choices


# ---------------------------------------------------------------------- the sampler
def image_generators(seed: int | Sequence[int] | None, count: int) -> list[torch.Generator]:
    """One RNG per image, image j seeded with seed + j (or with seed[j] when given a list).

    Per-image RNGs make an image depend only on its prompt and its own seed, not on what else
    is in the batch: image j of `generate_image(model, prompts, seed=s)` (prompt-major) equals
    `generate_image(model, prompt_of_j, seed=s + j)`, and different images never share noise.
    A list of seeds lets a server batch requests that each brought their own seed.
    """
    if isinstance(seed, Sequence):
        if len(seed) != count:
            raise ValueError(f"{len(seed)} seeds given for {count} images")
        return [torch.Generator().manual_seed(int(s)) for s in seed]
    if seed is None:
        seed = int(torch.randint(2**31 - count, ()))
    return [torch.Generator().manual_seed(seed + k) for k in range(count)]


@torch.no_grad()
def denoise(
    model,
    branches: Sequence[Context],
    generators: list[torch.Generator],
    steps: int,
    guidance_scale: float,
    scheduler: str | None = None,
    progress: bool = True,
    image_guidance_scale: float | None = None,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
    guidance: GuidanceOptions = PLAIN,
) -> torch.Tensor:
    """Run the reverse diffusion for N images; returns clean latents [N, C, h, w] (fp32).

    `branches` are contexts whose rows, concatenated, are N conditional rows followed (when
    guidance is on, i.e. guidance_scale != 1) by N unconditional rows. Each branch costs one
    forward per step, so one branch holding everything is the batched case.

    With `image_guidance_scale` (editing, InstructPix2Pix) the rows are 3N: N with the source and
    the instruction, N with the source alone, N with neither, and the prediction is
    e(none) + s_I (e(source) - e(none)) + s_T (e(source, text) - e(source)).

    `strength` < 1 starts from `init_latents` [N, C, h, w] noised to the level of step
    steps - round(steps * strength) and runs only the steps left (SDEdit; diffusers' img2img
    `strength`): what the noise leaves of the start image is kept, the rest is drawn anew.

    `guidance` refines plain CFG (lmfusion.sampling.guidance): an interval of noise levels outside
    which the fully conditioned prediction is used alone (both layouts), and for two-branch
    guidance a rescale and a down-weighted parallel part of the update.
    """
    check_strength(strength)
    config = model.config
    n = len(generators)
    clip = latent_clip(config.codec["name"])
    sampler = model.objective.sampler(scheduler, clip=clip)
    sampler.set_timesteps(steps)
    shape = (1, config.latent_channels, config.latent_size, config.latent_size)
    latents = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(model.device) * getattr(sampler, "init_noise_sigma", 1.0)
    timesteps = sampler.timesteps
    if strength < 1:
        if init_latents is None or init_latents.shape[0] != n:
            raise ValueError(f"strength < 1 needs init_latents for each of the {n} images")
        skipped = steps - max(1, round(steps * strength))
        timesteps = timesteps[skipped * sampler.order:]
        if hasattr(sampler, "set_begin_index"):  # schedulers that count their steps (flow Euler)
            sampler.set_begin_index(skipped * sampler.order)
        latents = model.objective.add_noise(init_latents.to(latents), latents, timesteps[:1].expand(n))
    total = sum(b.rows for b in branches)
    copies = total // n if n and total % n == 0 else 0
    if image_guidance_scale is not None and copies != 3:
        raise ValueError(f"branches hold {total} rows; three-branch guidance of {n} images needs {3 * n}")
    if image_guidance_scale is None and copies not in (1, 2):
        raise ValueError(f"branches hold {total} rows; {n} images need {n} (no guidance) or {2 * n}")
    levels = timesteps.float() / model.objective.num_train_timesteps
    for t, level in zip(tqdm(timesteps, desc="denoising", disable=not progress, leave=False), levels.tolist()):
        x = sampler.scale_model_input(latents, t) if hasattr(sampler, "scale_model_input") else latents
        rows = torch.cat([x] * copies)
        prediction = torch.cat([b.predict_noise(part, t) for b, part in zip(branches, rows.split([b.rows for b in branches]))])
        if not guidance.guides_at(level):
            prediction = prediction[:n]  # the fully conditioned rows come first in every layout
        elif copies == 3:
            full, source, none = prediction.chunk(3)
            prediction = none + image_guidance_scale * (source - none) + guidance_scale * (full - source)
        elif copies == 2:
            cond, uncond = prediction.chunk(2)
            prediction = guidance.combine(cond, uncond, guidance_scale)
        prediction = model.objective.clip_prediction(latents, prediction, t, clip)
        latents = sampler.step(prediction, t, latents, generator=generators).prev_sample
    return latents


@torch.no_grad()
def sample_latents(
    model,
    prompts: str | Sequence[str],
    n: int = 1,
    steps: int = 50,
    guidance_scale: float | None = None,
    seed: int | Sequence[int] | None = None,
    scheduler: str | None = None,
    allow_empty: bool = False,
    cache_prefix: bool = True,
    batch_cfg: bool = True,
    progress: bool = True,
    guidance: GuidanceOptions = PLAIN,
) -> torch.Tensor:
    """Latents [len(prompts) * n, C, h, w], prompt-major (n images of prompt 0 first).

    Image j is seeded with seed + j, or seed[j] for a list of len(prompts) * n seeds (see
    `image_generators`).

    cache_prefix=False re-runs the whole sequence every step and batch_cfg=False runs the two
    guidance branches as two forwards: both only exist to measure and test the fast path.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    check_sampling_args(steps, guidance_scale, n, scheduler, model.config.objective)
    guidance_scale = resolve_guidance_scale(model, guidance_scale)
    tokens = [prompt_tokens(model, p, allow_empty) for p in prompts]
    unconditional = [model.boi_token_id]
    guided = guidance_scale != 1 and any(t != unconditional for t in tokens)
    cond_rows = torch.arange(len(prompts)).repeat_interleave(n)

    if guided and batch_cfg:  # one context: prompts + the BOI-only row, one forward per step
        shared = Context.from_tokens(model, tokens + [unconditional], cache_prefix)
        branches = [shared.select(torch.cat([cond_rows, torch.full_like(cond_rows, len(prompts))]))]
    else:
        branches = [Context.from_tokens(model, tokens, cache_prefix).select(cond_rows)]
        if guided:
            branches.append(Context.from_tokens(model, [unconditional], cache_prefix).select(torch.zeros_like(cond_rows)))
    generators = image_generators(seed, len(prompts) * n)
    return denoise(model, branches, generators, steps, guidance_scale, scheduler, progress, guidance=guidance)


def generate_image(
    model,
    prompt: str | Sequence[str],
    steps: int = 50,
    guidance_scale: float | None = None,
    seed: int | Sequence[int] | None = None,
    scheduler: str | None = None,
    n: int = 1,
    allow_empty: bool = False,
    output: str = "pil",
    progress: bool = True,
    *,
    codec: ImageCodec,
    guidance: GuidanceOptions = PLAIN,
):
    """Generate n images per prompt; a list, prompt-major, of PIL images (or one tensor).

    output: "pil" (list of PIL images) or "tensor" ([N, 3, H, W] in [0, 1]); `sample_latents`
    gives the latents. guidance_scale: classifier-free guidance, eps = uncond + s * (cond - uncond);
    1 = none; None = the model's default (`model.config.default_guidance_scale`). codec: the
    model's image codec (`LMFusionPipeline` passes its own).
    """
    if output not in ("pil", "tensor"):
        raise ValueError(f"output must be 'pil' or 'tensor', got {output!r}")
    latents = sample_latents(
        model, prompt, n, steps, guidance_scale, seed, scheduler, allow_empty, progress=progress, guidance=guidance,
    )
    images = decode_latents(codec, latents)
    if output == "tensor":
        return images
    from ..data.images import to_pil

    return [to_pil(image) for image in images]
