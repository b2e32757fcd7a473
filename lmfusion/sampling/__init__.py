"""Inference: text-to-image, captioning, interleaved generation and plain text.

Functions take the model first (`generate_image(model, prompt, ...)`); `SamplingMixin` puts the
same calls on the model (`model.generate_image(prompt, ...)`) for a model class that lists it as
a base, and `LMFusionPipeline` bundles a loaded checkpoint with its codec.

Importing this package is cheap and imports nothing from `lmfusion.model`, so the model module
can import `SamplingMixin` without a cycle; everything else loads on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "generate_image": "image",
    "sample_latents": "image",
    "generate_text": "text",
    "generate_text_ids": "text",
    "caption": "text",
    "Context": "text",
    "generate_interleaved": "interleaved",
    "InterleavedSession": "interleaved",
    "LMFusionPipeline": "pipeline",
    "load_model": "pipeline",
}

__all__ = ["SamplingMixin", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class SamplingMixin:
    """`model.generate_image / caption / generate_interleaved / generate_text` (see the functions)."""

    def generate_image(self, prompt, steps: int = 50, guidance_scale: float = 1.6, seed: int | None = None,
                       scheduler: str | None = None, n: int = 1, **options):
        """n images per prompt as a list of PIL images (lmfusion.sampling.image.generate_image)."""
        from .image import generate_image

        return generate_image(self, prompt, steps, guidance_scale, seed, scheduler, n, **options)

    def caption(self, image, **options):
        """A caption for a path / PIL image / tensor (lmfusion.sampling.text.caption)."""
        from .text import caption

        return caption(self, image, **options)

    def generate_interleaved(self, prompt: str, **options) -> list:
        """Text and images after `prompt` (lmfusion.sampling.interleaved.generate_interleaved)."""
        from .interleaved import generate_interleaved

        return generate_interleaved(self, prompt, **options)

    def generate_text(self, prompt: str, max_new_tokens: int = 64, **options) -> str:
        """The base LM's continuation of `prompt` (lmfusion.sampling.text.generate_text)."""
        from .text import generate_text

        return generate_text(self, prompt, max_new_tokens, **options)
