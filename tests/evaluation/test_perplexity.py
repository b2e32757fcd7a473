"""Text preservation: frozen modes reproduce the base LM exactly; a changed text path shows up."""

import copy

import pytest
import torch

from lmfusion.evaluation.perplexity import compare_text, heldout_text, text_windows
from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.testing import tiny_lmfusion_config, tiny_text_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _pair(tokenizer, mode):
    base = tiny_text_model(len(tokenizer))
    model = LMFusionModel(copy.deepcopy(base), tiny_lmfusion_config(mode=mode))
    return base, model


@pytest.mark.parametrize("mode", ["lmfusion", "ffn_only"])
def test_frozen_modes_have_the_base_perplexity_exactly(tokenizer, mode):
    base, model = _pair(tokenizer, mode)
    result = compare_text(model, base, tokenizer, window=64)
    assert result["max_abs_logit_diff"] == 0.0 and result["logits_identical"]
    assert result["model_ppl"] == result["base_ppl"]
    assert result["tokens"] > 500
    # BOI/EOI take some probability mass, so renormalising over them can only raise perplexity.
    assert result["model_ppl_with_image_tokens"] >= result["model_ppl"]


def test_a_trained_text_path_is_detected(tokenizer):
    base, model = _pair(tokenizer, "dense")
    with torch.no_grad():
        model.text_model.model.layers[0].mlp.down_proj.weight.add_(0.05)
    result = compare_text(model, base, tokenizer, window=64)
    assert result["max_abs_logit_diff"] > 0 and not result["logits_identical"]
    assert result["model_ppl"] != result["base_ppl"]


def test_heldout_text_ships_with_the_package(tokenizer):
    text = heldout_text()
    assert len(text.split()) > 500
    windows = text_windows(tokenizer, text, window=128)
    assert all(w.shape[1] <= 128 for w in windows) and len(windows) > 3
    with pytest.raises(ValueError):
        text_windows(tokenizer, "", window=128)
