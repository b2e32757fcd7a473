"""Each token uses only its own modality's weights; attention follows the Transfusion mask."""

import copy

import pytest
import torch

from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.model.masks import image_segment_ids, transfusion_mask
from lmfusion.testing import tiny_lmfusion_config, tiny_text_model

N = 4  # tokens per image in the tiny config


def _model(mode="lmfusion"):
    model = LMFusionModel(tiny_text_model(300), tiny_lmfusion_config(mode=mode)).eval()
    # The output conv starts at zero (predict no noise); give it weights so changes show.
    torch.nn.init.normal_(model.image_out.conv_out.weight, std=0.1)
    return model


def _mixed_batch(model, text_before=5, text_after=3):
    length = text_before + N + 2 + text_after
    ids = torch.randint(0, 300, (1, length))
    ids[0, text_before] = model.boi_token_id
    ids[0, text_before + N + 1] = model.eoi_token_id
    image_mask = torch.zeros(1, length, dtype=torch.bool)
    image_mask[0, text_before + 1 : text_before + 1 + N] = True
    return ids, image_mask, torch.randn(1, 3, 16, 16), torch.tensor([300])


def _perturb(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.5)


def test_image_weights_do_not_touch_text_only_logits():
    model = _model()
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
        _perturb(model.image_layers)
        _perturb(model.image_norm)
        after = model(ids).logits
    assert torch.equal(before, after)


def test_image_weights_change_image_outputs_but_not_earlier_text():
    model = _model()
    ids, image_mask, latents, t = _mixed_batch(model)
    with torch.no_grad():
        before = model(ids, image_mask, latents, t)
        _perturb(model.image_layers[0].q_proj)  # an image-only attention weight
        after = model(ids, image_mask, latents, t)
    assert torch.equal(before.logits[0, :6], after.logits[0, :6])  # text up to and including BOI
    assert not torch.allclose(before.noise_pred, after.noise_pred)
    # Text after the image attends to the image, whose keys came from the changed projection.
    assert not torch.allclose(before.logits[0, -3:], after.logits[0, -3:])


def test_text_weights_route_only_text_rows_in_ffn():
    """Changing the text FFN of the last layer moves text logits but not the image prediction."""
    model = _model()
    ids, image_mask, latents, t = _mixed_batch(model)
    with torch.no_grad():
        before = model(ids, image_mask, latents, t)
        _perturb(model.text_model.model.layers[-1].mlp)  # last layer: nothing downstream mixes it in
        after = model(ids, image_mask, latents, t)
    assert torch.equal(before.noise_pred, after.noise_pred)
    assert not torch.allclose(before.logits[0, :5], after.logits[0, :5])


def test_mask_is_causal_with_bidirectional_images():
    image_mask = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    segments = image_segment_ids(image_mask, 4)
    assert segments.tolist() == [[-1, 0, 0, 0, 0, -1, -1, 1, 1, 1, 1, -1]]
    mask = transfusion_mask(segments)[0, 0]
    assert mask[1, 4]  # first patch sees the last patch of its own image
    assert not mask[1, 5]  # ...but no later text
    assert not mask[4, 7]  # ...nor a later image
    assert mask[7, 4] and mask[7, 0]  # later image sees earlier image and text
    assert not mask[0, 1]  # text is causal
    assert mask[5, 5] and not mask[5, 6]


def test_mask_two_adjacent_images_stay_separate_and_padding():
    image_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    segments = image_segment_ids(image_mask, 4)
    mask = transfusion_mask(segments, key_padding=torch.tensor([[1] * 9 + [0]]))[0, 0]
    assert mask[0, 3] and not mask[0, 4]
    assert not mask[8, 9]  # padding is never a key...
    assert mask[9, 9]  # ...except for itself, so its softmax row stays finite


def test_mask_with_cache_sees_all_real_past_keys():
    segments = torch.tensor([[0, 0, 0, 0]])
    padding = torch.tensor([[0, 1, 1, 1, 1, 1, 1]])
    mask = transfusion_mask(segments, padding, past_length=3)[0, 0]
    assert mask.shape == (4, 7)
    assert not mask[:, 0].any() and mask[:, 1:].all()


def test_modes_freeze_and_share_the_right_modules():
    lmf = _model("lmfusion")
    assert not any(p.requires_grad for p in lmf.text_model.parameters())
    assert all(p.requires_grad for p in lmf.image_layers.parameters())
    assert torch.equal(lmf.image_layers[1].mlp.up_proj.weight, lmf.text_model.model.layers[1].mlp.up_proj.weight)

    ffn = _model("ffn_only")
    assert not hasattr(ffn.image_layers[0], "q_proj") and hasattr(ffn.image_layers[0], "mlp")

    dense = _model("dense")
    assert dense.image_layers is None
    assert all(p.requires_grad for p in dense.text_model.parameters())

    base = tiny_text_model(300)
    scratch = LMFusionModel(copy.deepcopy(base), tiny_lmfusion_config(mode="scratch"))
    assert all(p.requires_grad for p in scratch.parameters())
    assert not torch.equal(scratch.text_model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(scratch.image_layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("mode", ["ffn_only", "dense"])
def test_shared_attention_modes_run_mixed_batches(mode):
    model = _model(mode)
    ids, image_mask, latents, t = _mixed_batch(model)
    with torch.no_grad():
        out = model(ids, image_mask, latents, t)
    assert out.noise_pred.shape == latents.shape and torch.isfinite(out.logits).all()


def test_wrong_number_of_image_positions_is_a_clear_error():
    model = _model()
    ids, image_mask, latents, t = _mixed_batch(model)
    with pytest.raises(ValueError, match="image positions"):
        model(ids, image_mask, torch.cat([latents, latents]), torch.tensor([1, 2]))
