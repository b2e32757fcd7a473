"""Work the frozen text path cannot use is skipped, and nothing else changes.

Text that nothing trainable precedes (a caption before its image) runs without an autograd
graph; its LM logits are constants except the BOI/EOI columns. Gradients, losses and logits must
be those of the full graph, the counted backward work must shrink, and routing must send every
token through exactly one modality's weights.
"""

import torch
from torch.utils.flop_counter import FlopCounterMode

from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.model.routing import frozen_context_mask
from lmfusion.model.sequence import SequenceBuilder
from lmfusion.testing import tiny_lmfusion_config, tiny_text_model, tiny_tokenizer


def _model():
    torch.manual_seed(0)
    model = LMFusionModel(tiny_text_model(300), tiny_lmfusion_config(), tokenizer=tiny_tokenizer(300))
    model.skip_frozen_context = True  # what TrainConfig.skip_frozen_context sets
    return model


def _batch(model):
    """Caption-first, image-first, an unconditional and a text-only example, right-padded."""
    builder = SequenceBuilder(model.tokenizer, model.boi_token_id, model.eoi_token_id, model.config.tokens_per_image)
    examples = [builder.text_then_image("a small red circle"), builder.image_then_text("a large blue square"),
                builder.text_then_image(""), builder.text_only("just some words here")]
    latents = torch.randn(3, model.config.latent_channels, model.config.latent_size, model.config.latent_size)
    return builder.collate(examples, latents)


def _loss_and_grads(model, batch, skip):
    model.skip_frozen_context = skip
    model.zero_grad(set_to_none=True)
    sums = model.loss_sums(batch, torch.Generator().manual_seed(3))
    (sums.text + 5 * sums.image).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return sums, grads


def test_skipping_frozen_context_keeps_losses_and_gradients():
    model = _model()
    batch = _batch(model)
    assert frozen_context_mask(batch.input_ids, batch.image_mask, batch.attention_mask, model.text_vocab_size).any()
    full, full_grads = _loss_and_grads(model, batch, skip=False)
    skipped, skipped_grads = _loss_and_grads(model, batch, skip=True)
    torch.testing.assert_close(skipped.text, full.text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(skipped.image, full.image, rtol=1e-5, atol=1e-5)
    assert set(skipped_grads) == set(full_grads)
    assert "special_head.weight" in skipped_grads  # context rows still teach "no BOI here"
    for name, grad in full_grads.items():
        torch.testing.assert_close(skipped_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_skipping_frozen_context_does_less_work():
    model = _model()
    batch = _batch(model)
    counts = {}
    for skip in (False, True):
        model.skip_frozen_context = skip
        with FlopCounterMode(display=False) as counter:
            sums = model.loss_sums(batch, torch.Generator().manual_seed(3))
            (sums.text + 5 * sums.image).backward()
        counts[skip] = counter.get_flop_counts()["Global"]
        model.zero_grad(set_to_none=True)
    mm = torch.ops.aten.mm
    # Here 44 of 72 positions are context (captions before images, the text-only row, padding).
    assert counts[True][mm] < 0.8 * counts[False][mm]  # the decoder layers' and LM head's matmuls
    assert counts[True][torch.ops.aten.convolution] == counts[False][torch.ops.aten.convolution]  # U-Net: unchanged


def test_inference_logits_are_unchanged():
    model = _model().eval()
    batch = _batch(model)
    with torch.no_grad():
        reference = model(batch.input_ids, batch.image_mask, batch.latents, torch.full((3,), 100),
                          batch.attention_mask).logits
    # With a graph (as in training) the context rows take the split path; values must not move.
    out = model(batch.input_ids, batch.image_mask, batch.latents, torch.full((3,), 100), batch.attention_mask,
                logits_mask=batch.text_targets()[0])
    torch.testing.assert_close(out.logits, reference[batch.text_targets()[0]], rtol=1e-5, atol=1e-5)


def test_context_mask_restarts_per_document():
    boi = 300
    ids = torch.tensor([[5, 6, boi, 0, 0, 7, 8, 9, boi, 0]])
    images = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0, 0, 1]], dtype=torch.bool)
    documents = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])
    mask = frozen_context_mask(ids, images, None, boi, documents)
    assert mask.tolist() == [[True, True, False, False, False, True, True, True, False, False]]
    as_one_row = frozen_context_mask(ids, images, None, boi)
    assert as_one_row[0, 5:].tolist() == [False] * 5  # without documents, text after an image is live


def test_every_token_goes_through_exactly_one_modality():
    """Count the rows each q_proj and FFN sees: text weights see text rows only, image copies image rows only."""
    model = _model()
    batch = _batch(model)
    seen = {}

    def count(name):
        def hook(module, args):
            seen[name] = seen.get(name, 0) + args[0].shape[0]
        return hook

    layer = model.layers[0]
    for name, module in (("text_q", layer.text.self_attn.q_proj), ("image_q", layer.image.q_proj),
                         ("text_ffn", layer.text.mlp), ("image_ffn", layer.image.mlp)):
        module.register_forward_pre_hook(count(name))
    model.loss_sums(batch, torch.Generator().manual_seed(3))
    n_image = int(batch.image_mask.sum())
    n_text = batch.image_mask.numel() - n_image
    assert seen["image_q"] == seen["image_ffn"] == n_image
    assert seen["text_q"] == seen["text_ffn"] == n_text  # context + live text rows, each once
