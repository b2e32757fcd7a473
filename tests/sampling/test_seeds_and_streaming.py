"""The two sampler hooks a server needs: one seed per image, and text one token at a time."""

import pytest
import torch

from lmfusion.sampling.image import sample_latents
from lmfusion.sampling.text import generate_text_ids, iter_text_ids

FAST = dict(steps=2, progress=False)


def test_a_list_of_seeds_gives_each_image_its_own_seed(model):
    """Requests with their own seeds batched into one call: each image as if sampled alone."""
    prompts, seeds = ["a red circle", "a small blue square above"], [7, 3]
    together = sample_latents(model, prompts, seed=seeds, **FAST)
    for row, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = sample_latents(model, prompt, seed=seed, **FAST)
        assert (together[row : row + 1] - alone).abs().max() < 1e-4
    swapped = sample_latents(model, prompts, seed=seeds[::-1], **FAST)
    assert not torch.allclose(swapped, together)


def test_a_seed_list_of_the_wrong_length_is_refused(model):
    with pytest.raises(ValueError, match="2 seeds given for 3 images"):
        sample_latents(model, "a red circle", n=3, seed=[1, 2], **FAST)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_iter_text_ids_yields_generate_text_ids(model, temperature):
    ids = list(model.tokenizer("the quick brown fox").input_ids)
    expected = generate_text_ids(model, ids, 12, temperature=temperature, seed=5)
    assert list(iter_text_ids(model, ids, 12, temperature=temperature, seed=5)) == expected
    assert len(expected) > 1


def test_iter_text_ids_checks_arguments_at_the_call(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        iter_text_ids(model, [1, 2], 0)
