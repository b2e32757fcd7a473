"""The optional learned patch-position table (config.image_position_embedding "learned")."""

import pytest
import torch

from lmfusion.config import LMFusionConfig
from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.model.sequence import SequenceBuilder
from lmfusion.testing import tiny_lmfusion_config, tiny_text_model, tiny_tokenizer


def _model(positions: str) -> LMFusionModel:
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = tiny_lmfusion_config(image_position_embedding=positions, patch_size=4)  # 16 patches per image
    return LMFusionModel(tiny_text_model(len(tokenizer)), config, tokenizer=tokenizer)


def _batch(model):
    builder = SequenceBuilder(model.tokenizer, model.boi_token_id, model.eoi_token_id, model.config.tokens_per_image)
    latents = torch.randn(2, 3, 16, 16)
    return builder.collate([builder.text_then_image("a red square"), builder.image_then_text("a blue one")], latents)


def test_the_table_starts_at_zero_and_changes_nothing_until_trained():
    plain, learned = _model("none"), _model("learned")
    assert learned.image_in.position.shape == (1, 16, learned.text_model.config.hidden_size)
    assert torch.count_nonzero(learned.image_in.position) == 0
    learned.load_state_dict(plain.state_dict(), strict=False)  # same weights, plus the zero table
    batch = _batch(plain)
    loss_plain = plain.loss(batch, torch.Generator().manual_seed(0)).loss
    loss_learned = learned.loss(batch, torch.Generator().manual_seed(0)).loss
    assert torch.equal(loss_plain, loss_learned)
    loss_learned.backward()
    grad = learned.image_in.position.grad
    assert grad is not None and grad.abs().sum(dim=-1).min() > 0  # every patch's row learns


def test_each_patch_gets_its_own_row():
    model = _model("learned")
    with torch.no_grad():
        model.image_in.position.copy_(torch.randn_like(model.image_in.position))
    latents, temb = torch.randn(3, 3, 16, 16), torch.randn(3, model.config.time_embed_dim)
    table = model.image_in.position.detach().clone()
    tokens, _ = model.image_in(latents, temb)
    model.image_in.position = None  # the same block without the table
    plain, _ = model.image_in(latents, temb)
    assert torch.allclose(tokens - plain, table.expand_as(tokens), atol=1e-5)


def test_the_table_is_saved_and_loaded_with_the_adapter(tiny_base, tmp_path):
    config = tiny_lmfusion_config(str(tiny_base), image_position_embedding="learned")
    model = LMFusionModel.from_text_model(str(tiny_base), config)
    with torch.no_grad():
        model.image_in.position.copy_(torch.randn_like(model.image_in.position))
    assert model.is_fresh("image_in.position")  # no counterpart in the base LM: the fresh-module lr
    model.save_pretrained(tmp_path / "saved")
    loaded = LMFusionModel.from_pretrained(tmp_path / "saved")
    assert loaded.config.image_position_embedding == "learned"
    assert torch.equal(loaded.image_in.position, model.image_in.position)


def test_unknown_value_is_one_line_error():
    with pytest.raises(ValueError, match="image_position_embedding must be one of"):
        LMFusionConfig(image_position_embedding="rope2d", codec={"name": "pixel"})
