"""Inference: text-to-image, captioning, interleaved generation and plain text.

Functions take the model first (`generate_image(model, prompt, ...)`), and `LMFusionPipeline`
owns a loaded model and its codec and offers the same calls (`pipe.generate_image(prompt)`), as
in diffusers. The model never imports this package; imports here load on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "generate_image": "image",
    "sample_latents": "image",
    "generate_text": "text",
    "generate_text_ids": "text",
    "caption": "text",
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
