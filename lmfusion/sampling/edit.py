"""Instruction-driven editing: `[BOI source EOI] instruction BOI`, then the target denoised.

The layout is the training one (SequenceBuilder.edit): the source enters clean (t = 0, as
`Context.append_image` appends any finished image), the instruction follows, and the target is
sampled after BOI over the cached prefix. Guidance is InstructPix2Pix's, over three prefixes that
the model saw in training through condition dropout:

    eps = e(none) + s_I (e(source) - e(none)) + s_T (e(source, text) - e(source))

with e(source) the prefix `[BOI source EOI] BOI` (instruction dropped) and e(none) just `BOI`
(both dropped: the unconditional branch of text-to-image). All rows, of all sources and of all
three branches, are left-padded into one batch: one forward per denoising step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..codecs.base import ImageCodec
from .context import Context
from .image import (check_sampling_args, check_strength, decode_latents, denoise, encode_images, image_generators,
                    load_images, prompt_tokens, resolve_guidance_scale)


def resolve_image_guidance_scale(model, image_guidance_scale: float | None) -> float:
    """The scale asked for, or (None) the model's own default, saved in its config."""
    return model.config.default_image_guidance_scale if image_guidance_scale is None else image_guidance_scale


def check_edit_args(steps: int, guidance_scale: float | None, image_guidance_scale: float | None, n: int = 1,
                    scheduler: str | None = None, objective: str | None = None, strength: float = 1.0) -> None:
    check_sampling_args(steps, guidance_scale, n, scheduler, objective)
    check_strength(strength)
    if image_guidance_scale is not None and image_guidance_scale < 0:
        raise ValueError(f"image_guidance_scale must be >= 0 (1 = none), got {image_guidance_scale}")


def edit_branches(model, sources: torch.Tensor, instructions: Sequence[str], n: int = 1,
                  guidance_scale: float | None = None,
                  image_guidance_scale: float | None = None,
                  cache_prefix: bool = True) -> tuple[list[Context], float | None, float]:
    """The contexts `denoise` runs, and the (image, text) scales it combines them with.

    Rows: each source's n copies with its instruction; then (guidance on) the same with the
    instruction dropped; then the BOI-only row. With image_guidance_scale 1 the formula is
    two-way CFG against the source-only branch, so that branch pair alone is run.
    """
    if any(not isinstance(text, str) or not text.strip() for text in instructions):
        raise ValueError("instruction is empty: say what to change, e.g. 'make it blue'")
    guidance_scale = resolve_guidance_scale(model, guidance_scale)
    image_guidance_scale = resolve_image_guidance_scale(model, image_guidance_scale)
    tokens = [prompt_tokens(model, text) for text in instructions]  # instruction ids + BOI
    boi = torch.full((len(instructions), 1), model.boi_token_id, dtype=torch.long)
    base = Context.from_tokens(model, [[model.boi_token_id]] * len(instructions), cache_prefix)
    base.append_image(sources)  # clean source, then EOI
    full = [base.select(torch.tensor([i])) for i in range(len(instructions))]
    for context, ids in zip(full, tokens):
        context.append_tokens(torch.tensor([ids]))
    rows = torch.arange(len(instructions)).repeat_interleave(n)
    if guidance_scale == 1 and image_guidance_scale == 1:
        return [Context.stack(full).select(rows)], None, 1.0
    source_only = base.select(torch.arange(len(instructions)))
    source_only.append_tokens(boi)
    if image_guidance_scale == 1:  # e(source) + s_T (e(source, text) - e(source))
        return [Context.stack(full + [source_only]).select(torch.cat([rows, rows + len(full)]))], None, guidance_scale
    none = Context.from_tokens(model, [[model.boi_token_id]], cache_prefix)
    shared = Context.stack(full + [source_only, none])
    order = torch.cat([rows, rows + len(full), torch.full_like(rows, 2 * len(full))])
    return [shared.select(order)], image_guidance_scale, guidance_scale


@torch.no_grad()
def edit_latents(
    model,
    sources: torch.Tensor,
    instructions: str | Sequence[str],
    n: int = 1,
    steps: int = 50,
    guidance_scale: float | None = None,
    image_guidance_scale: float | None = None,
    seed: int | Sequence[int] | None = None,
    scheduler: str | None = None,
    cache_prefix: bool = True,
    progress: bool = True,
    strength: float = 1.0,
) -> torch.Tensor:
    """Edited latents [len(sources) * n, C, h, w], source-major; sources are clean latents [S, C, h, w].

    One instruction for every source, or one per source. Image j is seeded with seed + j (or
    seed[j]), as in `sample_latents`, so an edit does not depend on what else is in the batch.
    strength < 1 starts the target from the source noised part of the way (SDEdit, see `denoise`)
    instead of from pure noise; 1 (the default) is InstructPix2Pix's sampling.
    """
    check_edit_args(steps, guidance_scale, image_guidance_scale, n, scheduler, model.config.objective, strength)
    instructions = [instructions] * len(sources) if isinstance(instructions, str) else list(instructions)
    if len(instructions) != len(sources):
        raise ValueError(f"{len(instructions)} instructions given for {len(sources)} source images")
    if not len(sources):
        raise ValueError("no source images given")
    branches, image_scale, text_scale = edit_branches(model, sources, instructions, n, guidance_scale,
                                                      image_guidance_scale, cache_prefix)
    generators = image_generators(seed, len(sources) * n)
    init = sources.repeat_interleave(n, dim=0) if strength < 1 else None
    return denoise(model, branches, generators, steps, text_scale, scheduler, progress, image_guidance_scale=image_scale,
                   init_latents=init, strength=strength)


def edit_image(
    model,
    image,
    instruction: str | Sequence[str],
    guidance_scale: float | None = None,
    image_guidance_scale: float | None = None,
    steps: int = 50,
    seed: int | Sequence[int] | None = None,
    scheduler: str | None = None,
    n: int = 1,
    output: str = "pil",
    progress: bool = True,
    *,
    codec: ImageCodec,
    strength: float = 1.0,
):
    """Edit an image (path, PIL image or [3, S, S] tensor in [0, 1]) or a list of them by an instruction.

    Returns n edits per image, image-major: a list of PIL images, or a [N, 3, S, S] tensor with
    output="tensor". guidance_scale (s_T) weighs the instruction, image_guidance_scale (s_I) the
    source; 1 and 1 = no guidance; guidance_scale None = the model's default. strength < 1 starts
    from the noised source instead of pure noise (see `edit_latents`).
    """
    if output not in ("pil", "tensor"):
        raise ValueError(f"output must be 'pil' or 'tensor', got {output!r}")
    pixels, _ = load_images(model, image)
    sources = encode_images(codec, pixels, model.device)
    latents = edit_latents(model, sources, instruction, n, steps, guidance_scale, image_guidance_scale, seed,
                           scheduler, progress=progress, strength=strength)
    images = decode_latents(codec, latents)
    if output == "tensor":
        return images
    from ..data.images import to_pil

    return [to_pil(picture) for picture in images]
