"""Editing: three-branch guidance (InstructPix2Pix) over the cached, batched prefix."""

import pytest
import torch

from lmfusion.codecs.registry import latent_clip
from lmfusion.sampling.context import Context
from lmfusion.sampling.edit import edit_image, edit_latents
from lmfusion.sampling.text import encode_text
from lmfusion.testing import tiny_sampling_model

TOL = 1e-4


@pytest.fixture(scope="module", params=["none", "previous", "residual"])
def edit_model(request, peaky_base):
    """The plain model, and ones whose down block also reads the previous image (image_condition
    "previous", and "residual", which also denoises relative to it) with non-zero weights for it,
    so that the source really enters the target's input."""
    if request.param == "none":
        return request.getfixturevalue("model")
    model = tiny_sampling_model(peaky_base, image_condition=request.param)
    with torch.no_grad():
        torch.nn.init.normal_(model.image_in.conv_in.weight, std=0.2)
    return model


def _sources(seed=0, count=2):
    return torch.rand(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _branch(model, source, instruction):
    """One branch built alone, with no cache (recomputing everything): the reference path."""
    if source is None:
        return Context.from_tokens(model, [[model.boi_token_id]], use_cache=False)
    context = Context.from_tokens(model, [[model.boi_token_id]], use_cache=False)
    context.append_image(source.unsqueeze(0))
    ids = (encode_text(model, instruction) if instruction else []) + [model.boi_token_id]
    context.append_tokens(torch.tensor([ids]))
    return context


def test_three_branch_guidance_equals_the_formula(edit_model):
    """One Euler step of edit_latents vs the three branches computed separately and combined by hand."""
    model = edit_model
    sources, texts, s_text, s_image = _sources(), ["make it blue", "move the small red circle to the left"], 3.0, 1.7
    edited = edit_latents(model, sources, texts, steps=1, guidance_scale=s_text, image_guidance_scale=s_image,
                          seed=5, progress=False)
    sampler = model.objective.sampler()
    sampler.set_timesteps(1)
    t = sampler.timesteps[0]
    config = model.config
    for row, (source, text) in enumerate(zip(sources, texts)):
        g = torch.Generator().manual_seed(5 + row)
        x = torch.randn(1, config.latent_channels, config.latent_size, config.latent_size, generator=g)
        full = _branch(model, source, text).predict_noise(x, t)
        image_only = _branch(model, source, "").predict_noise(x, t)
        none = _branch(model, None, "").predict_noise(x, t)
        assert not torch.allclose(full, image_only, atol=1e-3) and not torch.allclose(image_only, none, atol=1e-3)
        eps = none + s_image * (image_only - none) + s_text * (full - image_only)
        eps = model.objective.clip_prediction(x, eps, t, latent_clip(config.codec["name"]))  # as every sampler does
        want = sampler.step(eps, t, x, generator=[g]).prev_sample
        sampler.set_timesteps(1)  # step() advanced the scheduler's index
        assert (edited[row] - want[0]).abs().max() < TOL


def test_guidance_one_and_one_is_the_plain_conditional_edit(model):
    sources = _sources(1, 1)
    plain = edit_latents(model, sources, "make it blue", steps=2, guidance_scale=1.0, image_guidance_scale=1.0,
                         seed=0, progress=False)
    three = edit_latents(model, sources, "make it blue", steps=2, guidance_scale=1.0, image_guidance_scale=1.0 + 1e-9,
                         seed=0, progress=False)
    assert (plain - three).abs().max() < TOL  # the 3-branch path at scales ~1 collapses to the same edit


def test_cached_batched_edit_equals_recompute(edit_model):
    model = edit_model
    sources = _sources(2)
    options = dict(steps=3, guidance_scale=2.0, image_guidance_scale=1.5, seed=0, n=2, progress=False)
    fast = edit_latents(model, sources, ["make it blue", "remove the red circle"], **options)
    slow = edit_latents(model, sources, ["make it blue", "remove the red circle"], cache_prefix=False, **options)
    assert fast.shape[0] == 4 and (fast - slow).abs().max() < TOL
    alone = edit_latents(model, sources[1:], "remove the red circle", **{**options, "n": 1, "seed": 2})
    assert (fast[2] - alone[0]).abs().max() < TOL  # image j depends on its own seed and source only


def test_image_guidance_changes_the_edit_and_bad_arguments_are_refused(model, pixel_codec):
    image = (_sources(3, 1)[0] + 1) / 2
    a = edit_image(model, image, "make it blue", steps=2, image_guidance_scale=1.0, seed=0, codec=pixel_codec,
                   output="tensor", progress=False)
    b = edit_image(model, image, "make it blue", steps=2, image_guidance_scale=2.5, seed=0, codec=pixel_codec,
                   output="tensor", progress=False)
    assert a.shape == (1, 3, 16, 16) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="instruction is empty"):
        edit_image(model, image, "  ", codec=pixel_codec)
    with pytest.raises(ValueError, match="image_guidance_scale must be >= 0"):
        edit_image(model, image, "make it blue", image_guidance_scale=-1, codec=pixel_codec)
    with pytest.raises(ValueError, match="2 instructions given for 1 source"):
        edit_latents(model, _sources(0, 1), ["a", "b"])


def test_lmfusion_edit_writes_the_pipelines_edit_and_refuses_bad_input_in_one_line(checkpoint, model, pixel_codec,
                                                                                  tmp_path, capsys):
    from PIL import Image

    from lmfusion.cli import main
    from lmfusion.data.images import load_rgb_image

    source, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.new("RGB", (16, 16), (215, 25, 25)).save(source)
    argv = ["edit", "--checkpoint", str(checkpoint), "--image", str(source), "--prompt", "make it blue",
            "--steps", "2", "--seed", "3", "--image-guidance-scale", "1.5", "--guidance-scale", "2", "--device", "cpu"]
    assert main(argv + ["--out", str(out)]) == 0 and capsys.readouterr().out.strip() == str(out)
    want = edit_image(model, load_rgb_image(source, 16), "make it blue", guidance_scale=2.0, image_guidance_scale=1.5,
                      steps=2, seed=3, codec=pixel_codec, output="tensor", progress=False)[0]
    assert (load_rgb_image(out, 16) - want).abs().max() <= 1 / 255 + 1e-6
    assert main(argv + ["--out", str(out), "--strength", "0.5"]) == 0 and capsys.readouterr().out.strip() == str(out)
    want = edit_image(model, load_rgb_image(source, 16), "make it blue", guidance_scale=2.0, image_guidance_scale=1.5,
                      steps=2, seed=3, codec=pixel_codec, output="tensor", progress=False, strength=0.5)[0]
    assert (load_rgb_image(out, 16) - want).abs().max() <= 1 / 255 + 1e-6
    for extra, fragment in ((["--prompt", " "], "prompt is empty"), (["--image", str(tmp_path / "none.png")], "none.png"),
                            (["--image-guidance-scale", "-1"], "image_guidance_scale must be >= 0"),
                            (["--strength", "0"], "strength must be in (0, 1]")):
        code = main(argv + ["--out", str(out)] + extra)
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and fragment in err, err


def test_strength_starts_from_the_noised_source_and_runs_only_the_last_steps(model):
    """strength 0.5 of 2 steps: the source noised to the second step's level, then that one step (SDEdit)."""
    sources, seed = _sources(4, 1), 7
    edited = edit_latents(model, sources, "make it blue", steps=2, guidance_scale=1.0, image_guidance_scale=1.0,
                          seed=seed, strength=0.5, progress=False)
    sampler = model.objective.sampler()
    sampler.set_timesteps(2)
    t = sampler.timesteps[1]
    g = torch.Generator().manual_seed(seed)
    config = model.config
    noise = torch.randn(1, config.latent_channels, config.latent_size, config.latent_size, generator=g)
    sigma = float(t) / model.objective.num_train_timesteps
    x = (1 - sigma) * sources + sigma * noise  # the flow objective's noising, at the skipped-to level
    eps = _branch(model, sources[0], "make it blue").predict_noise(x, t)
    eps = model.objective.clip_prediction(x, eps, t, latent_clip(config.codec["name"]))
    sampler.set_begin_index(1)
    want = sampler.step(eps, t, x, generator=[g]).prev_sample
    assert 0 < sigma < 1 and (edited - want).abs().max() < TOL
    full = edit_latents(model, sources, "make it blue", steps=2, guidance_scale=1.0, image_guidance_scale=1.0,
                        seed=seed, progress=False)
    assert not torch.allclose(full, edited)  # strength 1 (the default) starts from pure noise instead


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5])
def test_a_strength_outside_zero_to_one_is_refused(model, strength):
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        edit_latents(model, _sources(0, 1), "make it blue", steps=2, strength=strength, progress=False)
