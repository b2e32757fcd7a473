"""The editing layout: [BOI source EOI] instruction [BOI target EOI]; source clean, loss on the target only."""

import pytest
import torch

from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.model.sequence import CLEAN_IMAGE, SequenceBuilder
from lmfusion.testing import tiny_lmfusion_config


@pytest.fixture(scope="module")
def model(tiny_base):
    torch.manual_seed(0)
    model = LMFusionModel.from_text_model(str(tiny_base), tiny_lmfusion_config(str(tiny_base)))
    torch.nn.init.normal_(model.image_out.conv_out.weight, std=0.1)
    return model


def _builder(model):
    return SequenceBuilder(model.tokenizer, model.boi_token_id, model.eoi_token_id, model.config.tokens_per_image)


def test_edit_layout_and_dropout_branches(model):
    b, n = _builder(model), model.config.tokens_per_image
    instruction = b.encode("make it blue")
    full = b.edit("make it blue")
    assert full.ids == [b.boi_id] + [-1] * n + [b.eoi_id] + instruction + [b.boi_id] + [-1] * n + [b.eoi_id, b.eos_id]
    assert full.max_timesteps == [CLEAN_IMAGE, 1000]
    assert b.edit("make it blue", drop_source=True).ids == instruction + [b.boi_id] + [-1] * n + [b.eoi_id, b.eos_id]
    no_text = b.edit("make it blue", drop_instruction=True)
    assert no_text.ids[: n + 2] == full.ids[: n + 2] and no_text.ids[n + 2] == b.boi_id
    # Both dropped is exactly the unconditional text-to-image example of caption dropout.
    assert b.edit("x", drop_source=True, drop_instruction=True).ids == b.text_then_image("").ids


def _edit_batch(model, source, target):
    b = _builder(model)
    examples = [b.edit("make it blue"), b.text_then_image("a red circle")]
    latents = torch.cat([source, target, torch.rand(1, 3, 16, 16) * 2 - 1])
    return b.collate(examples, latents)


def test_source_enters_clean_and_carries_no_loss(model, monkeypatch):
    torch.manual_seed(0)
    source, target = torch.rand(1, 3, 16, 16) * 2 - 1, torch.rand(1, 3, 16, 16) * 2 - 1
    batch = _edit_batch(model, source, target)
    assert batch.loss_images.tolist() == [False, True, True] and batch.num_loss_images == 2
    seen = {}
    original = model.forward

    def spy(*args, **kwargs):
        seen["latents"], seen["timesteps"] = args[2].clone(), args[3].clone()
        out = original(*args, **kwargs)
        seen["pred"] = out.noise_pred
        return out

    monkeypatch.setattr(model, "forward", spy)
    sums = model.loss_sums(batch, torch.Generator().manual_seed(0))
    assert sums.images == 2
    assert seen["timesteps"][0] == 0 and (seen["timesteps"][1:] > 0).all()
    assert torch.equal(seen["latents"][0], source[0])  # the source exactly, no noise
    assert not torch.allclose(seen["latents"][1], target[0])  # the target noised
    # The image loss is the per-image MSE of the two scored images only.
    g = torch.Generator().manual_seed(0)
    t = model.objective.sample_timesteps(2, batch.max_timesteps[1:], g)
    noise = torch.randn(batch.latents.shape, generator=g)
    want = model.objective.target(batch.latents[1:], noise[1:], t)
    expected = (seen["pred"][1:] - want).pow(2).flatten(1).mean(1).sum()
    torch.testing.assert_close(sums.image, expected)


def test_packed_edit_rows_equal_padded_ones(model):
    torch.manual_seed(2)
    b = _builder(model)
    examples = [b.edit("make it blue"), b.edit("make it small", drop_source=True), b.text_then_image("a red circle")]
    latents = torch.rand(4, 3, 16, 16) * 2 - 1
    padded = model.loss(b.collate(examples, latents), torch.Generator().manual_seed(0))
    packed_batch = b.pack(examples, latents, pack_length=64)
    assert packed_batch.input_ids.shape[0] < len(examples)
    packed = model.loss(packed_batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-4, atol=1e-5)
    assert packed.images == padded.images == 3
