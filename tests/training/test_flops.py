"""Training FLOPs: the stated formula matches what torch counts; freezing the text path is cheaper."""

import pytest

from lmfusion.training.flops import run_step_flops
from lmfusion.training import load_config


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    """400 shapes images at 32 px (360 train, 40 test), as the evaluation tests use."""
    from lmfusion.data import generate_shapes_dataset

    path = tmp_path_factory.mktemp("flops_data") / "shapes"
    return generate_shapes_dataset(path, 400, size=32, seed=0, progress=False, split=True, test_fraction=0.1)


@pytest.fixture(scope="module")
def flops(shapes_data, tiny_base, tmp_path_factory):
    cache = tmp_path_factory.mktemp("latents")
    result = {}
    for mode in ("lmfusion", "ffn_only", "dense", "scratch"):
        config = load_config("tiny", overrides=dict(
            base_model=str(tiny_base), data=str(shapes_data), mode=mode, latent_cache=str(cache),
            image_first_ratio=0.5, batch_size=8, progress=False))
        result[mode] = run_step_flops(config, sample_steps=1)
    return result


@pytest.mark.parametrize("mode", ["lmfusion", "ffn_only", "dense", "scratch"])
def test_formula_matches_the_counted_matmuls(flops, mode):
    f = flops[mode]
    # Matmuls are the decoder layers and LM head (the formula) plus the tiny timestep MLP.
    assert f["analytic_transformer"] == pytest.approx(f["matmul"], rel=0.01)
    assert f["measured"] == pytest.approx(f["matmul"] + f["convolution"] + f["attention"])
    assert f["attention"] > 0 and f["convolution"] > 0


def test_frozen_text_is_cheaper_but_not_free(flops):
    assert flops["lmfusion"]["matmul"] < flops["dense"]["matmul"]
    assert flops["ffn_only"]["matmul"] < flops["lmfusion"]["matmul"]  # frozen shared attention
    assert flops["dense"]["measured"] == flops["scratch"]["measured"]  # same compute, different init
    paths = flops["lmfusion"]["paths"]
    assert paths["text_trained"] == 0 and paths["image_trained"] == paths["image"]
    assert flops["lmfusion"]["trainable_parameters"] < flops["scratch"]["trainable_parameters"]
