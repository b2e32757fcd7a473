"""image_condition "previous": an image's down block also reads the clean latent of the image before it;
"residual": it reads it and denoises the difference from it."""

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


def test_residual_is_previous_run_on_the_difference_from_the_source():
    """The same weights: "residual" feeds the blocks x_s - (1 - s) c and returns their output - c, so
    an image with a source is denoised relative to it and one without is computed exactly as before."""
    previous, residual = _model("previous").eval(), _model("residual").eval()
    with torch.no_grad():
        torch.nn.init.normal_(previous.image_in.conv_in.weight, std=0.2)
        torch.nn.init.normal_(previous.image_out.conv_out.weight, std=0.2)
    residual.load_state_dict(previous.state_dict())
    builder = _builder(previous)
    batch = builder.collate(_examples(builder), torch.randn(4, 3, 16, 16))
    conditions = batch.condition_latents()
    timesteps = torch.tensor([900.0, 0.0, 400.0, 700.0])
    noisy = torch.randn(4, 3, 16, 16)
    s = (timesteps / 1000).view(-1, 1, 1, 1)

    def run(model, latents):
        with torch.no_grad():
            return model(batch.input_ids, batch.image_mask, latents, timesteps, batch.attention_mask,
                         image_conditions=conditions).noise_pred

    want = run(previous, noisy - (1 - s) * conditions) - conditions
    got = run(residual, noisy)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(got[[0, 1, 3]], run(previous, noisy)[[0, 1, 3]])  # no source: unchanged
    assert not torch.allclose(got[2], run(previous, noisy)[2])


def test_residual_targets_the_same_velocity_so_a_kept_source_costs_nothing_to_learn():
    """The training target stays noise - image; for a target equal to its source, a block that
    predicts noise - 0 from the difference it reads (pure noise scaled by s) has zero loss."""
    model = _model("residual")
    builder = _builder(model)
    source = torch.randn(1, 3, 16, 16)
    batch = builder.collate([builder.edit("keep it")], torch.cat([source, source]))
    noise, s = torch.randn(1, 3, 16, 16), torch.tensor(0.7)
    x_s = (1 - s) * source + s * noise
    velocity = noise - source  # the training target of the edit's target image
    from lmfusion.model.image_blocks import residual_input, residual_output
    difference = residual_input(x_s, source, s)
    assert torch.allclose(difference, s * noise, atol=1e-6)  # nothing of the scene left to redraw
    assert torch.allclose(residual_output(difference / s, source), velocity, atol=1e-5)
    assert batch.condition_latents()[1].equal(source[0])


def test_unknown_value_is_one_line_error():
    with pytest.raises(ValueError, match="image_condition must be one of"):
        LMFusionConfig(image_condition="concat", codec={"name": "pixel"})
    with pytest.raises(ValueError, match="'residual' needs objective 'flow'"):
        LMFusionConfig(image_condition="residual", objective="eps", codec={"name": "pixel"})
