"""The BOI margin hinge: its formula, that it is off by default, and that it pushes BOI down."""

import pytest
import torch

from lmfusion.model.draw_margin import boi_margin_hinge
from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.model.sequence import SequenceBuilder
from lmfusion.testing import tiny_lmfusion_config


def test_hinge_is_the_formula_and_skips_boi_targets():
    torch.manual_seed(0)
    logits, boi = torch.randn(6, 12) * 3, 10
    labels = torch.tensor([0, 3, boi, 7, boi, 11])
    expected = 0.0
    for row, label in zip(logits, labels):
        if label != boi:
            others = torch.cat([row[:boi], row[boi + 1:]])
            expected += max(0.0, 2.0 + float(row[boi] - torch.logsumexp(others, 0)))
    assert boi_margin_hinge(logits, labels, boi, 2.0).item() == pytest.approx(expected, rel=1e-6)
    assert boi_margin_hinge(logits, torch.full((6,), boi), boi, 2.0).item() == 0.0  # every target BOI


def test_negative_margin_is_refused():
    with pytest.raises(ValueError, match="boi_margin"):
        tiny_lmfusion_config(boi_margin=-1.0)


def _text_batch(model):
    builder = SequenceBuilder(model.tokenizer, model.boi_token_id, model.eoi_token_id, model.config.tokens_per_image)
    examples = [builder.text_only("what is two plus two"), builder.text_only("name a red fruit please")]
    return builder.collate(examples, None)


def test_margin_lowers_boi_at_text_targets_and_leaves_base_logits(tiny_base):
    torch.manual_seed(0)
    plain = LMFusionModel.from_text_model(str(tiny_base), tiny_lmfusion_config(str(tiny_base)))
    margin = LMFusionModel.from_text_model(str(tiny_base), tiny_lmfusion_config(str(tiny_base), boi_margin=4.0))
    margin.load_state_dict(plain.state_dict())
    batch = _text_batch(plain)
    with torch.no_grad():  # point BOI's row along the text states so that it beats writing: the false draw to cure
        states = plain.text_model.model(batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        direction = states.mean((0, 1)) / states.mean((0, 1)).norm()
        lse = plain.text_model.lm_head(states).logsumexp(-1)
        row = direction * ((lse + 1) / (states @ direction)).mean()
        for model in (plain, margin):
            model.special_head.weight[0] = row
    assert plain.loss(batch).loss.item() < margin.loss(batch).loss.item()  # the hinge adds to the token loss

    def boi_gap(model):
        with torch.no_grad():
            logits = model(batch.input_ids, batch.image_mask, None, None, batch.attention_mask).logits
        real = batch.attention_mask.bool()
        boi = logits[..., model.boi_token_id]
        others = logits.clone()
        others[..., model.boi_token_id] = float("-inf")
        return (boi - torch.logsumexp(others, -1))[real], logits[..., : model.boi_token_id][real]

    gap_before, base_before = boi_gap(margin)
    optimizer = torch.optim.AdamW(margin.trainable_parameters(), lr=5e-2)
    for _ in range(50):
        optimizer.zero_grad()
        margin.loss(batch).loss.backward()
        optimizer.step()
    gap_after, base_after = boi_gap(margin)
    assert gap_before.max() > 0  # it would have drawn
    assert gap_after.max() < -2.0  # now BOI is well below half the mass at every text position
    assert torch.equal(base_before, base_after)  # the base vocabulary's logits never moved
