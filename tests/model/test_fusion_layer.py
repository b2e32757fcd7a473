"""FusionDecoderLayer: one module per fused layer, unchanged saved names, per-layer checkpointing."""

import copy

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from lmfusion.config import LMFusionConfig
from lmfusion.model.fusion_layer import FusionDecoderLayer
from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.testing import tiny_lmfusion_config, tiny_text_model

CANONICAL = ("text_model.", "image_layers.", "image_norm.", "time_embed.", "image_in.", "image_out.", "special_")


def _model(mode="lmfusion"):
    return LMFusionModel(tiny_text_model(300), tiny_lmfusion_config(mode=mode))


def _mixed_batch(model):
    n = model.config.tokens_per_image
    ids = torch.randint(0, 300, (2, n + 6))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 2 : 2 + n] = True
    return ids, mask, torch.randn(2, 3, 16, 16), torch.tensor([10, 700])


def test_each_layer_holds_the_base_text_layer_and_its_image_copy():
    model = _model()
    assert len(model.layers) == len(model.text_model.model.layers)
    for index, layer in enumerate(model.layers):
        assert isinstance(layer, FusionDecoderLayer)
        assert layer.text is model.text_model.model.layers[index]  # the base model's own object
        assert layer.image is model.image_layers[index]
    assert all(layer.image is None for layer in _model("dense").layers)


def test_saved_names_are_the_pre_fusion_layer_names():
    model = _model()
    keys = set(model.state_dict())
    assert not any(k.startswith("layers.") for k in keys)
    assert all(k.startswith(CANONICAL) for k in keys)
    assert {k for k in model.adapter_state_dict() if k.startswith("image_layers.0.")} >= {"image_layers.0.q_proj.weight"}
    # A state dict in the saved naming loads strictly (what older checkpoints hold).
    other = _model()
    other.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(other.image_layers[1].mlp.up_proj.weight, model.image_layers[1].mlp.up_proj.weight)


def test_gradient_checkpointing_wraps_each_layer_and_keeps_gradients():
    plain = _model().train()
    wrapped = copy.deepcopy(plain)
    wrapped.enable_gradient_checkpointing()
    assert all(isinstance(layer, CheckpointWrapper) for layer in wrapped.layers)
    assert set(wrapped.state_dict()) == set(plain.state_dict())
    batch = _mixed_batch(plain)
    for model in (plain, wrapped):
        out = model(*batch)
        (out.logits.square().mean() + out.noise_pred.square().mean()).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), wrapped.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, msg=name)
    wrapped.enable_gradient_checkpointing(False)
    assert all(isinstance(layer, FusionDecoderLayer) for layer in wrapped.layers)


def test_the_callers_config_is_not_written_to():
    config = tiny_lmfusion_config()
    model = LMFusionModel(tiny_text_model(300), config)
    assert config.base_model_hash is None and model.config.base_model_hash
    assert model.config is not config and isinstance(model.config, LMFusionConfig)


def test_bf16_text_logits_equal_the_bf16_base_model():
    """Casting the model keeps the rotary frequencies in fp32, as HF loads them."""
    base = tiny_text_model(300).to(torch.bfloat16)
    base.model.rotary_emb.inv_freq = base.model.rotary_emb.inv_freq.float()  # as from_pretrained(dtype=bf16) has it
    model = LMFusionModel(copy.deepcopy(base), tiny_lmfusion_config()).to(torch.bfloat16).eval()
    assert model.text_model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.special_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert torch.equal(model(ids).logits[..., :300], base(ids).logits)
