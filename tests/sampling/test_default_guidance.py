"""A model's own default guidance scales (text, and image for edits): saved in its config, used
wherever no scale is given."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

from lmfusion.cli import main
from lmfusion.config import LMFusionConfig
from lmfusion.diffusion import DEFAULT_GUIDANCE_SCALE, DEFAULT_IMAGE_GUIDANCE_SCALE
from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.sampling.edit import edit_latents
from lmfusion.sampling.image import sample_latents

SAVED = 4.0  # far from DEFAULT_GUIDANCE_SCALE, so the two give different images


@contextlib.contextmanager
def saved_guidance(model, scale, name="guidance_scale"):
    before = getattr(model.config, name)
    setattr(model.config, name, scale)
    try:
        yield model
    finally:
        setattr(model.config, name, before)


def _sample(model, guidance_scale):
    return sample_latents(model, ["a red circle"], n=1, steps=3, guidance_scale=guidance_scale, seed=0, progress=False)


def test_no_scale_given_means_the_models_saved_one(model):
    with saved_guidance(model, SAVED):
        own = _sample(model, None)
        assert torch.equal(own, _sample(model, SAVED))
        assert not torch.allclose(own, _sample(model, DEFAULT_GUIDANCE_SCALE))
    with saved_guidance(model, None):  # a model that saved none: the samplers' default
        assert torch.equal(_sample(model, None), _sample(model, DEFAULT_GUIDANCE_SCALE))


def test_edits_use_the_models_saved_image_guidance_when_none_is_given(model):
    sources = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def edit(image_guidance_scale):
        return edit_latents(model, sources, "make it blue", steps=2, guidance_scale=2.0,
                            image_guidance_scale=image_guidance_scale, seed=0, progress=False)

    with saved_guidance(model, SAVED, "image_guidance_scale"):
        own = edit(None)
        assert torch.equal(own, edit(SAVED))
        assert not torch.allclose(own, edit(DEFAULT_IMAGE_GUIDANCE_SCALE))


def test_the_scale_survives_save_and_load_and_bad_values_are_refused(model, tmp_path):
    with saved_guidance(model, SAVED):
        model.save_pretrained(tmp_path / "m")
    assert LMFusionModel.from_pretrained(tmp_path / "m").config.default_guidance_scale == SAVED
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        LMFusionConfig(codec={"name": "pixel"}, guidance_scale=-1.0)


@pytest.fixture(scope="module")
def checkpoint_with_guidance(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt_guidance") / "model"
    with saved_guidance(model, SAVED):
        model.save_pretrained(path)
    return path


def test_generate_without_the_flag_draws_at_the_models_scale(checkpoint_with_guidance, tmp_path, capsys):
    def draw(name, *flags):
        out = tmp_path / name
        assert main(["generate", "--checkpoint", str(checkpoint_with_guidance), "--prompt", "a red circle",
                     "--out", str(out), "--steps", "2", "--device", "cpu", *flags]) == 0
        return out.read_bytes()

    own = draw("own.png")
    assert own == draw("saved.png", "--guidance-scale", str(SAVED))
    assert own != draw("global.png", "--guidance-scale", str(DEFAULT_GUIDANCE_SCALE))
    capsys.readouterr()


def test_the_server_defaults_to_the_models_scale(model):
    pytest.importorskip("fastapi")
    from lmfusion.serving.app import ServeSettings, create_app

    with saved_guidance(model, SAVED), saved_guidance(model, 2.5, "image_guidance_scale"):
        settings = create_app(model).state.settings
        assert (settings.guidance_scale, settings.image_guidance_scale) == (SAVED, 2.5)
        assert create_app(model, ServeSettings(guidance_scale=2.0)).state.settings.guidance_scale == 2.0


def test_a_preset_saves_its_measured_scale_with_the_model():
    from lmfusion.training.config import load_config

    assert load_config("quickstart").guidance_scale == 5.0
    assert load_config("quickstart", overrides={"guidance_scale": "null"}).guidance_scale is None
    with pytest.raises(ValueError, match=re.escape("guidance_scale must be a float | None")):
        load_config("quickstart", overrides={"guidance_scale": "strong"})
    with pytest.raises(ValueError, match="must be >= 0"):  # at load, before any data is encoded
        load_config("edit", overrides={"image_guidance_scale": -1})
