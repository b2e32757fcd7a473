"""Text-only input must give exactly the base model's logits (frozen text modules, same ops)."""

import copy

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.testing import tiny_lmfusion_config, tiny_text_model


def _pair(base, **overrides):
    model = LMFusionModel(copy.deepcopy(base), tiny_lmfusion_config(**overrides)).eval()
    return base.eval(), model


def test_text_only_logits_bit_identical_tiny_llama():
    base, model = _pair(tiny_text_model(300))
    ids = torch.randint(0, 300, (3, 40))
    with torch.no_grad():
        expected = base(ids).logits
        got = model(ids).logits
    assert got.shape == (3, 40, 302)
    assert torch.equal(got[..., :300], expected)


def test_text_only_with_left_padding_matches_base():
    base, model = _pair(tiny_text_model(300))
    ids = torch.randint(0, 300, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = base(ids, attention_mask=mask, position_ids=positions).logits
        got = model(ids, attention_mask=mask).logits
    assert torch.equal(got[..., :300][mask.bool()], expected[mask.bool()])


def test_qwen2_with_qkv_biases_is_supported_and_exact():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    config._attn_implementation = "sdpa"
    base = Qwen2ForCausalLM(config).eval()
    assert base.model.layers[0].self_attn.q_proj.bias is not None
    model = LMFusionModel(copy.deepcopy(base), tiny_lmfusion_config()).eval()
    assert model.image_layers[0].q_proj.bias is not None
    assert torch.equal(model.image_layers[0].q_proj.bias, base.model.layers[0].self_attn.q_proj.bias)
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits[..., :200], base(ids).logits)


def test_smollm2_text_logits_bit_identical(smollm2):
    base, tokenizer = smollm2
    model = LMFusionModel(base, tiny_lmfusion_config(latent_size=64, image_size=64, patch_size=8)).eval()
    batch = tokenizer(["The capital of France is a city that"], return_tensors="pt")
    with torch.no_grad():
        ids = batch.input_ids[:1]
        length = ids.shape[1]
        expected = base(ids).logits
        got = model(ids).logits
        assert torch.equal(got[..., : expected.shape[-1]], expected)
        # Mixed input: text before the first image is unchanged.
        n = model.config.tokens_per_image
        mixed = torch.cat([ids, torch.full((1, n + 2), 0)], dim=1)
        mixed[0, length] = model.boi_token_id
        mixed[0, -1] = model.eoi_token_id
        image_mask = torch.zeros_like(mixed, dtype=torch.bool)
        image_mask[0, length + 1 : length + 1 + n] = True
        out = model(mixed, image_mask, torch.randn(1, 3, 64, 64), torch.tensor([500]))
    prefix = out.logits[0, :length, : expected.shape[-1]]
    # Mixed batches use an explicit mask (not SDPA's is_causal path) and other matmul shapes, so
    # bit-identity is not promised there; the difference must stay at float rounding level.
    assert (prefix - expected[0]).abs().max() < 1e-4
