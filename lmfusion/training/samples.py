"""The trainer's sample grids: generated images and captions (or, for editing data, edits) every
`sample_every` steps, through the same pipeline users run."""

from __future__ import annotations

import torch

from . import checkpoint as ckpt
from .config import TrainConfig


def write_samples(model, codec, data, config: TrainConfig, step: int, log) -> None:
    """A grid of generated images for the sample prompts, and captions of a few training images.

    Optional by design: the samplers live in lmfusion.sampling; if that is missing the run goes on.
    """
    try:
        from ..sampling import LMFusionPipeline
    except (ImportError, AttributeError) as error:
        log.say(f"step {step}: samples skipped (lmfusion.sampling unavailable: {error})")
        return
    from ..data import make_grid, save_image_grid

    was_training = model.training
    model.eval()
    try:
        pipe = LMFusionPipeline(model, codec)  # the trainer's codec: the one the data was encoded with
        shown = range(min(4, len(data)))
        if getattr(data, "is_chat", False):  # what a chat run learnt is measured by lmfusion eval --task chat
            log.say(f"step {step}: no sample grid for chat data (measure it with lmfusion eval --task chat)")
            return
        if getattr(data, "is_edit", False):  # sources, their edits, then the true targets
            return _write_edit_samples(pipe, data, shown, config, step, log)
        images = pipe.generate_image(list(config.sample_prompts), steps=config.sample_steps,
                                     guidance_scale=config.sample_guidance_scale, seed=config.seed, output="tensor",
                                     progress=False)
        pixels = codec.decode(data.latents(shown).to(model.device)).float().cpu()
        captions = pipe.caption(pixels)
    except Exception as error:  # a sampler bug must not kill a long run; the checkpoint is safe
        log.say(f"step {step}: sample writing failed, training goes on: {type(error).__name__}: {error}")
        return
    finally:
        model.train(was_training)
    if not log.enabled:  # a non-writing rank of a sharded run only took part in the forward passes
        return
    folder = log.run_dir / "samples"
    grid = save_image_grid(images, folder / f"{ckpt.step_name(step)}.png", nrow=len(images))
    lines = [f"step {step}: generated ({config.sample_steps} steps, guidance scale {config.sample_guidance_scale}), left to right:"]
    lines += [f"  {p}" for p in config.sample_prompts]
    lines += ["captions of training images (model | reference):"]
    lines += [f"  {c!r} | {data.caption(i)!r}" for i, c in enumerate(captions)]
    (folder / f"{ckpt.step_name(step)}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    log.writer.add_image("samples", make_grid(images, nrow=len(images)), step)
    log.writer.add_text("samples/captions", "\n\n".join(lines), step)
    log.say(f"step {step}: samples written to {grid}")


def _write_edit_samples(pipe, data, shown, config: TrainConfig, step: int, log) -> None:
    """An editing run's grid: row 1 the training sources, row 2 the model's edits, row 3 the targets."""
    from ..data import make_grid, save_image_grid

    device = pipe.model.device
    edited = pipe.edit_latents(data.source_latents(shown).to(device), [data.caption(i) for i in shown],
                               steps=config.sample_steps, guidance_scale=config.sample_guidance_scale, seed=config.seed,
                               progress=False)
    rows = [data.source_latents(shown).to(device), edited, data.latents(shown).to(device)]
    images = torch.cat([pipe.codec.decode(r).float().clamp(0, 1).cpu() for r in rows])
    if not log.enabled:
        return
    folder = log.run_dir / "samples"
    grid = save_image_grid(images, folder / f"{ckpt.step_name(step)}.png", nrow=len(shown))
    lines = [f"step {step}: edits ({config.sample_steps} steps, guidance scale {config.sample_guidance_scale}, "
             "image guidance default); rows: sources, edits, targets; columns:"]
    lines += [f"  {data.caption(i)}" for i in shown]
    (folder / f"{ckpt.step_name(step)}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    log.writer.add_image("samples", make_grid(images, nrow=len(shown)), step)
    log.say(f"step {step}: edit samples written to {grid}")
