"""Helpers for the tiny-VLM tests."""

from __future__ import annotations

from pathlib import Path

from lmfusion.vlm.train import TinyLlavaRecipe


def tiny_recipe(base: Path, **overrides) -> TinyLlavaRecipe:
    """16 px images in 8 px patches (4 image tokens), a 32-wide tower: a build takes about a second."""
    values = dict(base_model=str(base), image_size=16, patch_size=8, tower_hidden=32, tower_layers=1, tower_heads=2,
                  train_scenes=32, pretrain_steps=3, pretrain_batch_size=8, steps=4, batch_size=4, log_every=2)
    return TinyLlavaRecipe(**{**values, **overrides})
