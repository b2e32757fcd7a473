"""image_condition "previous": an image's down block also reads the clean latent of the image before it."""

import pytest
import torch

from lmfusion.config import LMFusionConfig
from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.model.sequence import SequenceBuilder
from lmfusion.testing import tiny_lmfusion_config, tiny_text_model, tiny_tokenizer


def _model(condition: str) -> LMFusionModel:
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    return LMFusionModel(tiny_text_model(len(tokenizer)), tiny_lmfusion_config(image_condition=condition),
                         tokenizer=tokenizer)


def _builder(model) -> SequenceBuilder:
    return SequenceBuilder(model.tokenizer, model.boi_token_id, model.eoi_token_id, model.config.tokens_per_image)


def _examples(builder):
    # images in order: caption image (0), edit source (1), edit target (2), source-dropped target (3)
    return [builder.text_then_image("a red square"), builder.edit("make it blue"),
            builder.edit("make it blue", drop_source=True)]


@pytest.mark.parametrize("layout", ["collate", "pack"])
def test_each_image_points_at_the_image_before_it_in_its_own_example(layout):
    builder = _builder(_model("previous"))
    latents = torch.randn(4, 3, 16, 16)
    batch = (builder.collate(_examples(builder), latents) if layout == "collate"
             else builder.pack(_examples(builder), latents, 200))
    assert batch.previous_images.tolist() == [-1, -1, 1, -1]
    conditions = batch.condition_latents()
    assert torch.equal(conditions[2], latents[1])
    assert torch.count_nonzero(conditions[[0, 1, 3]]) == 0
    assert builder.collate([builder.text_then_image("a")], latents[:1]).previous_images is None


def test_the_extra_channels_start_at_zero_then_learn_from_the_source():
    plain, conditioned = _model("none"), _model("previous")
    weight = conditioned.image_in.conv_in.weight
    assert weight.shape[1] == 2 * plain.image_in.conv_in.weight.shape[1]
    assert torch.count_nonzero(weight[:, 3:]) == 0
    state = plain.state_dict()
    state["image_in.conv_in.weight"] = torch.cat([state["image_in.conv_in.weight"], weight[:, 3:].detach()], 1)
    conditioned.load_state_dict(state)
    builder = _builder(plain)
    batch = builder.collate(_examples(builder), torch.randn(4, 3, 16, 16))
    loss_plain = plain.loss(batch, torch.Generator().manual_seed(0)).loss
    loss_conditioned = conditioned.loss(batch, torch.Generator().manual_seed(0)).loss
    assert torch.allclose(loss_plain, loss_conditioned, atol=1e-6)  # same output until trained
    loss_conditioned.backward()
    assert weight.grad[:, 3:].abs().sum() > 0  # the source reaches the target's input


def test_conditions_change_the_prediction_only_where_given():
    model = _model("previous").eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.image_in.conv_in.weight, std=0.2)
    latents, temb = torch.randn(2, 3, 16, 16), torch.randn(2, model.config.time_embed_dim)
    none, _ = model.image_in(latents, temb)
    zeros, _ = model.image_in(latents, temb, torch.zeros_like(latents))
    given, _ = model.image_in(latents, temb, torch.randn_like(latents))
    assert torch.equal(none, zeros) and not torch.allclose(none, given)


def test_unknown_value_is_one_line_error():
    with pytest.raises(ValueError, match="image_condition must be one of"):
        LMFusionConfig(image_condition="concat", codec={"name": "pixel"})
