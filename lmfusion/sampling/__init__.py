"""Inference: text-to-image, captioning, interleaved generation and plain text.

`LMFusionPipeline` owns a loaded model and its image codec and offers every call
(`pipe.generate_image(prompt)`, `pipe.caption(image)`, ...), as in diffusers; the CLI, the server,
evaluation and the trainer's sample grids use it. Underneath are plain functions that take the
model first (`sample_latents(model, prompt, ...)`), and, where they read or write pixels, the codec
explicitly (`generate_image(model, prompt, codec=...)`). The model never imports this package;
imports here load on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "generate_image": "image",
    "sample_latents": "image",
    "generate_text": "text",
    "generate_text_ids": "text",
    "caption": "text",
    "edit_image": "edit",
    "edit_latents": "edit",
    "Context": "context",
    "generate_interleaved": "interleaved",
    "InterleavedSession": "interleaved",
    "LMFusionPipeline": "pipeline",
    "load_model": "pipeline",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
