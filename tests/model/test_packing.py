"""Packed rows compute what the same examples padded one per row compute; flex equals the dense mask."""

import pytest
import torch
import torch.nn.functional as F

from lmfusion.diffusion import per_image_mse
from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.model.sequence import SequenceBuilder
from lmfusion.testing import tiny_lmfusion_config, tiny_text_model, tiny_tokenizer


def _model(**overrides):
    torch.manual_seed(0)
    return LMFusionModel(tiny_text_model(300), tiny_lmfusion_config(**overrides), tokenizer=tiny_tokenizer(300))


def _examples(model):
    """Caption-first, image-first, unconditional and text-only examples of different lengths."""
    builder = SequenceBuilder(model.tokenizer, model.boi_token_id, model.eoi_token_id, model.config.tokens_per_image)
    examples = [builder.text_then_image("a small red circle"), builder.image_then_text("a large blue square on the left"),
                builder.text_only("some words"), builder.text_then_image(""),
                builder.image_then_text("a green triangle"), builder.text_then_image("a big yellow thing at the top")]
    c, s = model.config.latent_channels, model.config.latent_size
    latents = torch.randn(sum(len(e.max_timesteps) for e in examples), c, s, s, generator=torch.Generator().manual_seed(1))
    return builder, examples, latents


def _per_example_terms(model, batch, seed=3):
    """Per-token CE (in reading order) and per-image MSE, with gradients of their sum."""
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(seed)
    wants, labels = batch.text_targets()
    n = batch.latents.shape[0]
    t = model.objective.sample_timesteps(n, batch.max_timesteps, generator)
    noise = torch.randn(batch.latents.shape, generator=generator)
    noisy = model.objective.add_noise(batch.latents, noise, t)
    out = model(batch.input_ids, batch.image_mask, noisy, t, batch.attention_mask, position_ids=batch.position_ids,
                logits_mask=wants, document_ids=batch.document_ids)
    ce = F.cross_entropy(out.logits, labels, reduction="none")
    mse = per_image_mse(out.noise_pred, model.objective.target(batch.latents, noise, t))
    (ce.sum() + 5 * mse.sum()).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return ce.detach(), mse.detach(), grads


def test_pack_layout():
    model = _model()
    builder, examples, latents = _examples(model)
    lengths = [len(e.ids) for e in examples]
    pack_length = max(lengths) + 12
    batch = builder.pack(examples, latents, pack_length)
    assert batch.input_ids.shape[1] == pack_length
    assert batch.num_tokens == sum(lengths)
    assert batch.input_ids.shape[0] < len(examples)  # several examples share a row
    for row in range(batch.input_ids.shape[0]):  # padding only at the tail of a row
        real = batch.attention_mask[row].bool()
        assert not (~real[:-1] & real[1:]).any()
        docs = batch.document_ids[row][real]
        for doc in docs.unique():  # positions restart at 0 in every example
            assert batch.position_ids[row][real][docs == doc].tolist() == list(range(int((docs == doc).sum())))
    wants, labels = batch.text_targets()
    assert int(wants.sum()) == int(builder.collate(examples, latents).text_targets()[0].sum())
    assert batch.fill == pytest.approx(sum(lengths) / batch.input_ids.numel())


def test_pack_refuses_an_example_longer_than_a_row():
    model = _model()
    builder, examples, latents = _examples(model)
    with pytest.raises(ValueError, match="does not fit pack_length 10"):
        builder.pack(examples, latents, 10)


def test_packed_equals_unpacked_per_example_losses_and_gradients():
    model = _model()
    builder, examples, latents = _examples(model)
    padded = builder.collate(examples, latents)
    packed = builder.pack(examples, latents, max(len(e.ids) for e in examples) + 20)
    ce_a, mse_a, grads_a = _per_example_terms(model, padded)
    ce_b, mse_b, grads_b = _per_example_terms(model, packed)
    torch.testing.assert_close(ce_b, ce_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mse_b, mse_a, rtol=1e-5, atol=1e-5)
    assert set(grads_a) == set(grads_b)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_flex_attention_equals_the_dense_mask(layout):
    """flex_attention (eager on a CPU: forward only) against the dense-mask SDPA path."""
    dense, flex = _model(), _model(attention="flex")
    flex.load_state_dict(dense.state_dict())
    builder, examples, latents = _examples(dense)
    batch = (builder.collate(examples, latents) if layout == "padded"
             else builder.pack(examples, latents, max(len(e.ids) for e in examples) + 20))
    t = torch.linspace(50, 900, latents.shape[0])
    outputs = []
    for model in (dense, flex):
        with torch.no_grad():
            outputs.append(model.eval()(batch.input_ids, batch.image_mask, latents, t, batch.attention_mask,
                                        position_ids=batch.position_ids, document_ids=batch.document_ids))
    real = batch.attention_mask.bool() & ~batch.image_mask
    torch.testing.assert_close(outputs[1].logits[real], outputs[0].logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[1].noise_pred, outputs[0].noise_pred, rtol=1e-5, atol=1e-5)


def test_documents_are_not_targets_of_each_other():
    model = _model()
    builder = SequenceBuilder(model.tokenizer, model.boi_token_id, model.eoi_token_id, model.config.tokens_per_image)
    batch = builder.pack([builder.text_only("one two"), builder.text_only("three four")], None, 64)
    wants, labels = batch.text_targets()
    first_end = int((batch.document_ids[0] == 0).sum()) - 1  # the first example's last token (its EOS)
    assert not wants[0, first_end]
    assert int(wants.sum()) == sum(int((batch.document_ids[0] == d).sum()) - 1 for d in (0, 1))
