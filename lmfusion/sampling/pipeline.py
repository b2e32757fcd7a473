"""`LMFusionPipeline`: a loaded model and its codec behind the user-facing entry points.

    pipe = LMFusionPipeline.from_pretrained("runs/shapes")      # a run folder or a model folder
    pipe.generate_image("a red circle", steps=50, guidance_scale=3.0, seed=0)   # [PIL.Image]
    pipe.caption("photo.png")                                                   # str
    pipe.answer("photo.png", "What colour is it?")          # str (a VLM base answers, e.g. LLaVAFusion)
    pipe.edit("photo.png", "make it blue", guidance_scale=3.0, image_guidance_scale=1.5)   # [PIL.Image]
    pipe.generate_interleaved("Draw a red circle, then describe it.")           # [str | PIL.Image]
    pipe.generate_text("The capital of France is")                              # str

The same functions are plain functions taking the model first (lmfusion.sampling.image/text/
interleaved), and those that read or write pixels also take `codec=`. The model itself has no
sampling methods and no codec: the pipeline owns both, as a diffusers pipeline owns its unet and vae.
The CLI, the server, evaluation and the trainer's sample grids all go through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..codecs import load_codec
from ..codecs.base import ImageCodec
from .edit import edit_image, edit_latents
from .image import generate_image, sample_latents
from .interleaved import InterleavedSession, generate_interleaved
from .text import caption, generate_text
from .understanding import DEFAULT_CAPTION_QUESTION, answer_batch


def resolve_device(device: str | None) -> torch.device:
    """The requested device, or cuda when available; a bad name is a user error, not a crash."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r}") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def load_model(path: str | Path, device: str | None = None, dtype: torch.dtype = torch.float32):
    """Load a model folder, checkpoint folder or run folder (its latest model) for inference."""
    from ..model.lmfusion import LMFusionModel
    from ..run_folders import resolve_checkpoint

    device = resolve_device(device)
    model = LMFusionModel.from_pretrained(resolve_checkpoint(path), dtype=dtype)
    return model.to(device).eval()


class LMFusionPipeline:
    """A model and its image codec; every method forwards to the sampling functions.

    The pipeline is the codec's one owner: it builds the codec the model was trained with
    (`model.config.codec`) on the model's device, or takes one already built (the trainer's), and
    hands it to the functions that read or write pixels.
    """

    def __init__(self, model, codec: ImageCodec | None = None):
        self.model = model
        self.codec = codec if codec is not None else load_codec(**model.config.codec).to(model.device)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None, dtype: torch.dtype = torch.float32) -> "LMFusionPipeline":
        return cls(load_model(path, device, dtype))

    def generate_image(self, prompt, steps: int = 50, guidance_scale: float | None = None,
                       seed: int | Sequence[int] | None = None, scheduler: str | None = None, n: int = 1, **options):
        return generate_image(self.model, prompt, steps, guidance_scale, seed, scheduler, n, codec=self.codec, **options)

    def sample_latents(self, prompts, **options) -> torch.Tensor:
        """The latents `generate_image` would decode (see `lmfusion.sampling.image.sample_latents`)."""
        return sample_latents(self.model, prompts, **options)

    def edit(self, image, instruction, guidance_scale: float | None = None,
             image_guidance_scale: float | None = None, steps: int = 50,
             seed: int | Sequence[int] | None = None, scheduler: str | None = None, n: int = 1, **options):
        """Edit image(s) by an instruction, with InstructPix2Pix's three-branch guidance
        (see lmfusion.sampling.edit); a list of PIL images, n per input image."""
        return edit_image(self.model, image, instruction, guidance_scale, image_guidance_scale, steps, seed, scheduler,
                          n, codec=self.codec, **options)

    def edit_latents(self, sources: torch.Tensor, instructions, **options) -> torch.Tensor:
        """Edited latents of clean source latents (see `lmfusion.sampling.edit.edit_latents`)."""
        return edit_latents(self.model, sources, instructions, **options)

    def caption(self, image, **options):
        """A caption per image. With a VLM base the VLM describes it through its own understanding
        path (asked DEFAULT_CAPTION_QUESTION); otherwise the image modules read the latents."""
        if self.model.is_vlm:
            return self.answer(image, DEFAULT_CAPTION_QUESTION, **options)
        return caption(self.model, image, codec=self.codec, **options)

    def answer(self, image, question: str, **options):
        """The VLM base's answer about each image (a path / PIL image, or a list: one answer each)."""
        single = not isinstance(image, (list, tuple)) and not (torch.is_tensor(image) and image.dim() == 4)
        images = [image] if single else list(image)
        if not images:
            raise ValueError("no images given")
        answers = answer_batch(self.model, [[item] for item in images], [question] * len(images), **options)
        return answers[0] if single else answers

    def generate_text(self, prompt: str, max_new_tokens: int = 64, **options) -> str:
        return generate_text(self.model, prompt, max_new_tokens, **options)

    def generate_interleaved(self, prompt: str, **options) -> list:
        return generate_interleaved(self.model, prompt, codec=self.codec, **options)

    def chat(self, **options) -> InterleavedSession:
        """A session that keeps its context between `send` calls."""
        return InterleavedSession(self.model, codec=self.codec, **options)
