"""Text-to-image sampling: the cached, batched fast path must equal the naive computation."""

import pytest
import torch

from lmfusion.sampling.guidance import GuidanceOptions
from lmfusion.sampling.image import generate_image, max_prompt_tokens, sample_latents

PROMPTS = ["a red circle", "a large green triangle to the left of a small yellow circle"]
TOL = 1e-4


def _sample(model, prompts=PROMPTS, **options):
    defaults = dict(n=2, steps=3, guidance_scale=2.0, seed=0, progress=False)
    return sample_latents(model, prompts, **{**defaults, **options})


def test_same_seed_same_image_other_seed_other_image(model):
    first, again = _sample(model), _sample(model)
    assert torch.equal(first, again)
    assert not torch.allclose(first, _sample(model, seed=1))
    assert not torch.allclose(first[0], first[1])  # the n images of a prompt differ


SAMPLERS = [("flow", "euler"), ("eps", "ddim"), ("eps", "ddpm")]


def _model_for(objective, model, eps_model):
    return model if objective == "flow" else eps_model


@pytest.mark.parametrize("objective,scheduler", SAMPLERS)
def test_cached_prefix_equals_recompute_single_prompt(model, eps_model, objective, scheduler):
    model = _model_for(objective, model, eps_model)
    fast = _sample(model, PROMPTS[:1], n=1, guidance_scale=1.0, scheduler=scheduler)
    slow = _sample(model, PROMPTS[:1], n=1, guidance_scale=1.0, scheduler=scheduler, cache_prefix=False)
    assert (fast - slow).abs().max() < TOL


@pytest.mark.parametrize("objective,scheduler", SAMPLERS)
def test_cached_prefix_equals_recompute_cfg_two_prompts_left_padded(model, eps_model, objective, scheduler):
    model = _model_for(objective, model, eps_model)
    fast = _sample(model, scheduler=scheduler)
    slow = _sample(model, scheduler=scheduler, cache_prefix=False)
    assert (fast - slow).abs().max() < TOL


def test_a_sampler_that_does_not_fit_the_objective_is_refused(model, eps_model):
    with pytest.raises(ValueError, match="does not fit a model trained with objective 'flow'"):
        _sample(model, scheduler="ddim")
    with pytest.raises(ValueError, match="unknown scheduler"):
        _sample(eps_model, scheduler="heun")


def test_batched_cfg_equals_two_passes(model):
    batched = _sample(model)
    two_passes = _sample(model, batch_cfg=False)
    assert (batched - two_passes).abs().max() < TOL


def test_batch_composition_does_not_change_an_image(model):
    """Image j of a batch (seed + j) equals that prompt sampled alone with seed + j, although
    the short prompt is left-padded in the batch and not alone."""
    together = _sample(model, n=2)
    for j, prompt in enumerate([PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]):
        alone = _sample(model, [prompt], n=1, seed=j)
        assert (together[j : j + 1] - alone).abs().max() < TOL


def test_guidance_changes_the_image_and_zero_guidance_is_unconditional(model):
    guided = _sample(model, PROMPTS[:1], n=1, guidance_scale=3.0)
    plain = _sample(model, PROMPTS[:1], n=1, guidance_scale=1.0)
    assert not torch.allclose(guided, plain)
    zero = _sample(model, PROMPTS[:1], n=1, guidance_scale=0.0)  # eps = uncond
    unconditional = _sample(model, [""], n=1, guidance_scale=1.0, allow_empty=True)
    assert (zero - unconditional).abs().max() < TOL


def test_guidance_interval_guides_only_the_steps_inside_it(model):
    everywhere = _sample(model, PROMPTS, steps=4, guidance_scale=3.0)
    within = _sample(model, PROMPTS, steps=4, guidance_scale=3.0, guidance=GuidanceOptions(interval=(0, 1)))
    assert (everywhere - within).abs().max() < TOL
    unguided = _sample(model, PROMPTS, steps=4, guidance_scale=1.0)
    nowhere = _sample(model, PROMPTS, steps=4, guidance_scale=3.0, guidance=GuidanceOptions(interval=(0, 0)))  # no step at 0
    assert (unguided - nowhere).abs().max() < TOL
    partly = _sample(model, PROMPTS, steps=4, guidance_scale=3.0, guidance=GuidanceOptions(interval=(0, 0.9)))
    assert (partly - everywhere).abs().max() > 10 * TOL and (partly - unguided).abs().max() > 10 * TOL


def test_guidance_rescale_and_projection_follow_their_formulas():
    cond, uncond = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    plain = uncond + 5 * (cond - uncond)
    assert torch.allclose(GuidanceOptions().combine(cond, uncond, 5), plain)
    assert torch.allclose(GuidanceOptions(parallel_weight=1.0).combine(cond, uncond, 5), plain)
    rescaled = GuidanceOptions(rescale=1.0).combine(cond, uncond, 5)  # the guided std matches the conditional one
    assert torch.allclose(rescaled.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), atol=1e-5)
    projected = GuidanceOptions(parallel_weight=0.0).combine(cond, uncond, 5)
    update = (projected - uncond) / 5  # only the part of cond - uncond orthogonal to cond is left
    assert (update * cond).sum(dim=(1, 2, 3)).abs().max() < 1e-4
    assert torch.allclose(update + (cond - uncond - update), cond - uncond)
    for bad, message in [(dict(interval=(0.6, 0.2)), "0 <= lo <= hi <= 1"), (dict(interval="high"), "two noise levels"),
                         (dict(rescale=2.0), "rescale must be in"), (dict(parallel_weight=-1), "parallel_weight")]:
        with pytest.raises(ValueError, match=message):
            GuidanceOptions(**bad)


def test_prompt_matters(model):
    a, b = _sample(model, [PROMPTS[0]], n=1), _sample(model, [PROMPTS[1]], n=1)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(prompts=""), "prompt is empty"),
        (dict(prompts=["a red circle", "  "]), "prompt is empty"),
        (dict(prompts=[]), "no prompts"),
        (dict(guidance_scale=-0.5), "guidance_scale must be >= 0"),
        (dict(steps=0), "steps must be >= 1"),
        (dict(n=0), "n must be >= 1"),
        (dict(scheduler="heun"), "unknown scheduler"),
    ],
)
def test_bad_input_raises_value_error(model, options, message):
    prompts = options.pop("prompts", "a red circle")
    with pytest.raises(ValueError, match=message):
        sample_latents(model, prompts, steps=options.pop("steps", 2), progress=False, **options)


def test_over_long_prompt_names_the_limit(model):
    limit = max_prompt_tokens(model)
    assert limit == 512 - model.config.tokens_per_image - 2
    with pytest.raises(ValueError, match=f"at most {limit} fit"):
        sample_latents(model, "red " * (limit + 10), steps=1, progress=False)


def test_generate_image_returns_n_pil_images_per_prompt(model, pixel_codec):
    images = generate_image(model, PROMPTS, steps=2, seed=0, n=2, progress=False, codec=pixel_codec)
    assert len(images) == 4
    assert all(image.size == (16, 16) and image.mode == "RGB" for image in images)
    tensor = generate_image(model, PROMPTS[:1], steps=2, seed=0, n=1, progress=False, codec=pixel_codec, output="tensor")
    assert tensor.shape == (1, 3, 16, 16) and 0 <= tensor.min() and tensor.max() <= 1
