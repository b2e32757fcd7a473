"""Evaluation samples through the pipeline, batched, and equals it image by image; generation metrics on real images."""

import pytest
import torch

from lmfusion.evaluation.data import feature_net_for, load_split, split_paths
from lmfusion.evaluation.feature_net import FeatureNetRecipe
from lmfusion.evaluation.generation import generate_images, generation_metrics, oracle_scores
from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.sampling import LMFusionPipeline
from lmfusion.testing import tiny_lmfusion_config

PROMPTS = ["a small red circle", "a large blue square on the left", "a small red circle"]


@pytest.fixture(scope="module")
def model(tiny_base):
    model = LMFusionModel.from_text_model(str(tiny_base), tiny_lmfusion_config(base_model=str(tiny_base))).eval()
    with torch.no_grad():  # the output head starts at zero; make the prediction depend on the input
        torch.nn.init.normal_(model.image_out.conv_out.weight, std=0.2)
    return model


@pytest.fixture(scope="module")
def pipe(model):
    return LMFusionPipeline(model)


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_each_image_is_the_public_sampler_with_its_own_seed(pipe, guidance_scale):
    batched = generate_images(pipe, PROMPTS, seed=7, steps=3, guidance_scale=guidance_scale, batch_size=2)
    assert batched.shape == (3, 3, 16, 16)
    for i, prompt in enumerate(PROMPTS):
        alone = pipe.generate_image(prompt, steps=3, guidance_scale=guidance_scale, seed=7 + i, output="tensor", progress=False)
        torch.testing.assert_close(batched[i], alone[0], atol=1e-4, rtol=1e-4)
    assert not torch.equal(batched[0], batched[2])  # same prompt, different seed


def test_real_images_score_well(shapes_data, feature_cache):
    test = load_split(split_paths(shapes_data)[1], 32, 20)
    oracle = oracle_scores(test.images, test.metas)
    assert oracle["colour"] == 1.0 and oracle["all_correct"] >= 0.8
    net, _ = feature_net_for(shapes_data, FeatureNetRecipe(), feature_cache)
    noise = torch.rand_like(test.images)
    metrics = generation_metrics(test.images, test.images, test.metas, net, reference=noise)
    assert metrics["fid"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["fid_real_vs_real"] > 1.0  # noise is far from shapes
    assert metrics["oracle"] == metrics["oracle_on_real"]


def test_prompt_labels_score_whether_an_image_shows_its_prompt(shapes_data, feature_cache):
    test = load_split(split_paths(shapes_data)[1], 32, 20)
    net, _ = feature_net_for(shapes_data, FeatureNetRecipe(), feature_cache)
    matched = generation_metrics(test.images, test.images, test.metas, net, prompts=test.captions)
    assert matched["prompt_labels"] == matched["prompt_labels_on_real"]
    assert matched["prompt_labels"]["balanced_accuracy"] > 0.8
    shuffled = test.images[torch.arange(len(test.images)).roll(1)]  # every image drawn for another prompt
    wrong = generation_metrics(shuffled, test.images, test.metas, net, prompts=test.captions)
    assert wrong["prompt_labels"]["balanced_accuracy"] < matched["prompt_labels"]["balanced_accuracy"] - 0.2
