"""Model FLOPs (lmfusion.training.metrics) against torch's measured count, and the token classes."""

import pytest
import torch

from lmfusion.training import load_config
from lmfusion.training.data import build_batch_source, load_or_encode
from lmfusion.training.flops import measure_step_flops
from lmfusion.training.loop import StepPlan, build_model
from lmfusion.training.metrics import path_parameters, peak_flops, step_flops, token_classes


VOCAB = 100  # BOI = 100, EOI = 101, as LMFusionModel numbers them after the base vocabulary


class _Batch:
    def __init__(self, image_mask, attention_mask, document_ids=None):
        self.image_mask, self.attention_mask = image_mask, attention_mask
        self.input_ids = torch.zeros_like(image_mask, dtype=torch.long)
        starts = image_mask.clone()
        starts[:, 1:] &= ~image_mask[:, :-1]
        ends = image_mask.clone()
        ends[:, :-1] &= ~image_mask[:, 1:]
        self.input_ids[:, :-1][starts[:, 1:]] = VOCAB  # BOI before each image
        self.input_ids[:, 1:][ends[:, :-1]] = VOCAB + 1  # EOI after it
        if document_ids is not None:
            self.document_ids = document_ids


def test_token_classes_follow_the_first_boi_of_each_document():
    # Packed row: doc 0 = text text BOI img img EOI text; doc 1 = text BOI img EOI; then padding.
    image = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    real = torch.tensor([[1] * 11 + [0]])
    docs = torch.tensor([[0] * 7 + [1] * 5])
    c = token_classes(_Batch(image, real, docs), VOCAB)
    assert c["text_free"][0].tolist() == [1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert c["text_upstream"][0].tolist() == [0, 0, 1, 0, 0, 1, 1, 0, 1, 0, 1, 0]
    assert c["padding"][0].tolist() == [0] * 11 + [1]
    assert c["context"][0, :9].tolist() == [1, 2, 3, 4, 5, 6, 7, 1, 2]
    # Without document_ids the row is one document: the second document's caption is now upstream.
    assert bool(token_classes(_Batch(image, real), VOCAB)["text_upstream"][0, 7])


def test_no_mfu_on_cpu():
    assert peak_flops("cpu") is None


def test_matmuls_agree_with_the_measured_count(shapes, tiny_base, tmp_path):
    config = load_config("tiny", overrides=dict(base_model=str(tiny_base), data=str(shapes),
                                                latent_cache=str(tmp_path), image_first_ratio=0.5, batch_size=8,
                                                progress=False))
    model, codec = build_model(config.replace(skip_frozen_context=True))
    source = build_batch_source(load_or_encode(config.data, config.image_size, codec, config.latent_cache,
                                               progress=False), model, config)
    measured = measure_step_flops(model, source, config, [0])
    ours = step_flops(model, source.batch(StepPlan(8, 8, 1).positions(0, 0))[0])
    assert ours["tokens_text_free"] > 0 and ours["tokens_text_upstream"] > 0
    # What runs besides the useful work: padding goes forward through the frozen text layers (2N);
    # like caption-before-image text it is frozen context, so no backward runs for it.
    n = path_parameters(model)["text"]
    executed = ours["layers"] + ours["head"] + 2 * n * ours["tokens_padding"]
    assert executed == pytest.approx(measured["matmul"], rel=0.01)  # the rest: the timestep MLP
    # U-Net: 3x forward; the measured count skips the input gradient of the first convolution.
    assert ours["unet"] == pytest.approx(measured["convolution"], rel=0.1)
    assert 0 < ours["attention"] < measured["attention"]  # causal, per document, no padding
