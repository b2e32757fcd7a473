"""An exponential moving average of the trainable weights, saved beside them for sampling.

Diffusion models are usually sampled from an EMA of their weights rather than from the last
step's (DDPM, Stable Diffusion, diffusers' training scripts). The average here is diffusers'
`EMAModel` over the parameters that train, with its warm-up decay min(decay, (1 + n) / (10 + n))
after n updates, so a run of a few hundred steps averages roughly its last tens of steps.

A checkpoint with an average holds it as a second model folder, `ema/`, in the same format as
`model/`: `--checkpoint runs/x/checkpoints/step_000360/ema` samples from it, and `--resume`
restores it from there. Training, probes and the run's sample grids use the raw weights.
Off by default: on the 360-step quickstart it did not beat the last weights (two training seeds,
benchmarks/results/quickstart.md); longer runs at a constant learning rate are where it is known to pay.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

EMA_DIR = "ema"


class WeightAverage:
    """EMA of `model`'s trainable parameters (held in fp32 on their device)."""

    def __init__(self, model: nn.Module, decay: float):
        from diffusers.training_utils import EMAModel

        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.average = EMAModel(self._params(model), decay=decay, foreach=True)

    def _params(self, model: nn.Module) -> list[nn.Parameter]:
        named = dict(model.named_parameters())
        return [named[name] for name in self.names]

    @property
    def updates(self) -> int:
        return self.average.optimization_step

    def update(self, model: nn.Module) -> None:
        self.average.step(self._params(model))

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Within the block the model holds the averaged weights; the trained ones come back after."""
        params = self._params(model)
        self.average.store(params)
        self.average.copy_to(params)
        try:
            yield model
        finally:
            self.average.restore(params)

    def save(self, model: nn.Module, folder: Path) -> None:
        """`folder` becomes a model folder (LMFusionModel.save_pretrained) of the averaged weights."""
        with self.applied(model):
            model.save_pretrained(folder)

    def load(self, model: nn.Module, folder: Path, updates: int) -> None:
        """Restore the average from a model folder written by `save`, after `updates` updates."""
        from ..integrity import read_safetensors, verify_manifest
        from ..model.lmfusion import WEIGHTS_FILE

        verify_manifest(folder)
        params = self._params(model)
        self.average.store(params)
        try:  # through the model, which knows its saved names (wrappers add prefixes to parameter names)
            model.load_adapter_state(read_safetensors(folder / WEIGHTS_FILE), folder / WEIGHTS_FILE)
            with torch.no_grad():
                torch._foreach_copy_(self.average.shadow_params, params)
        finally:
            self.average.restore(params)
        self.average.optimization_step = updates
