"""ema_decay: a moving average of the trainable weights beside them, which leaves training unchanged."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.training import train
from lmfusion.training.ema import WeightAverage

STEPS = 6


def _weights(run_dir, folder: str, step: int = STEPS) -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / folder / "lmfusion_weights.safetensors"))


def test_average_follows_diffusers_warmup_formula():
    layer = nn.Linear(2, 2, bias=False)
    frozen = nn.Linear(2, 2, bias=False).requires_grad_(False)
    model = nn.ModuleDict({"trained": layer, "frozen": frozen})
    average = WeightAverage(model, decay=0.6)
    assert average.names == ["trained.weight"]
    expected = layer.weight.detach().clone()
    for n in range(1, 5):
        with torch.no_grad():
            layer.weight.add_(1.0)
        average.update(model)
        step = n - 1  # diffusers counts from the first update, which copies the weights (decay 0)
        decay = 0.0 if step <= 0 else min(0.6, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * layer.weight.detach()
    raw = layer.weight.detach().clone()
    with average.applied(model):
        assert torch.allclose(layer.weight, expected)
    assert torch.equal(layer.weight, raw), "the trained weights come back after the block"


def test_ema_leaves_training_unchanged_and_saves_a_loadable_average(make_config, tmp_path):
    plain = make_config(runs_dir=str(tmp_path / "plain"), max_steps=STEPS, checkpoint_every=3)
    averaged = plain.replace(runs_dir=str(tmp_path / "averaged"), ema_decay=0.9)
    train(plain)
    train(averaged)
    raw, reference = _weights(averaged.run_dir, "model"), _weights(plain.run_dir, "model")
    assert raw.keys() == reference.keys()
    assert all(torch.equal(raw[k], reference[k]) for k in raw), "keeping an average must not change training"
    assert not (plain.run_dir / "checkpoints" / f"step_{STEPS:06d}" / "ema").exists()
    ema = _weights(averaged.run_dir, "ema")
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if k.startswith("image_layers."))
    loaded = LMFusionModel.from_pretrained(averaged.run_dir / "checkpoints" / f"step_{STEPS:06d}" / "ema")
    state = loaded.adapter_state_dict()
    assert all(torch.equal(state[k], ema[k]) for k in ema), "--checkpoint .../ema loads the average"

def test_resume_restores_the_average_exactly(make_config, tmp_path):
    config = make_config(runs_dir=str(tmp_path / "runs"), max_steps=STEPS, checkpoint_every=3, keep_checkpoints=3,
                         ema_decay=0.9)
    train(config)
    reference = _weights(config.run_dir, "ema")
    shutil.rmtree(config.run_dir / "checkpoints" / f"step_{STEPS:06d}")
    (config.run_dir / "latest").write_text("step_000003\n")
    resumed = train(config, resume=True)
    assert resumed["first_step"] == 3
    again = _weights(config.run_dir, "ema")
    assert all(torch.equal(again[k], reference[k]) for k in reference)


def test_ema_decay_is_validated(make_config):
    with pytest.raises(ValueError, match="ema_decay must be in"):
        make_config(ema_decay=1.0)
