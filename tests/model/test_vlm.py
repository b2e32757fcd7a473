"""LLaVAFusion: a VLM base stays exactly itself for understanding, whatever the image modules learned."""

import pytest
import torch
from PIL import Image
from transformers import Qwen2VLConfig

from lmfusion.base_models import check_supported, weights_hash
from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.model.sequence import SequenceBuilder
from lmfusion.model.vlm import understanding_features
from lmfusion.sampling.understanding import vlm_prompt
from lmfusion.testing import tiny_lmfusion_config, tiny_vlm

# (family, vision tower): every supported family, with a CLS-token tower (CLIP) and one without (SigLIP).
CASES = [("llava", "clip"), ("llava", "siglip"), ("llava_next", "clip"), ("llava_onevision", "siglip")]
IMAGES = [Image.new("RGB", (32, 32), (220, 30, 30)), Image.new("RGB", (48, 24), (20, 40, 230)),
          Image.new("RGB", (24, 56), (30, 200, 60))]


def _perturb_image_side(model: LMFusionModel, seed: int = 0) -> None:
    """Stand-in for trained generation weights: every trainable tensor moved well away from its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def _wrap(family, tower):
    vlm, processor = tiny_vlm(family, tower)
    tokenizer = processor.tokenizer if processor is not None else None
    model = LMFusionModel(vlm, tiny_lmfusion_config("tiny-vlm"), tokenizer=tokenizer, processor=processor).eval()
    _perturb_image_side(model)
    return vlm, model


def _inputs(vlm, model, images_per_row, questions):
    """Processor-made inputs, or (OneVision, whose processor needs torchvision) the same layout by hand."""
    if model.processor is not None:
        prompts = [vlm_prompt(model, q, len(images)) for q, images in zip(questions, images_per_row)]
        flat = [image for images in images_per_row for image in images]
        return dict(model.processor(images=flat, text=prompts, return_tensors="pt", padding=True))
    from transformers import LlavaOnevisionImageProcessorPil

    from lmfusion.testing import _PINPOINTS

    processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=_PINPOINTS)
    rows, pixel_values, sizes = [], [], []
    for images, question in zip(images_per_row, questions):
        ids = [5, 9]
        for image in images:
            pixels = processor(images=[image], return_tensors="pt")
            n = understanding_features(vlm, pixels["pixel_values"], pixels["image_sizes"]).shape[0]
            ids += [vlm.config.image_token_id] * n
            pixel_values.append(pixels["pixel_values"][0])
            sizes.append(pixels["image_sizes"][0])
        rows.append(ids + [40 + len(question) % 50, 41, 42])
    length = max(map(len, rows))
    input_ids = torch.tensor([[1] * (length - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    patches = max(p.shape[0] for p in pixel_values)  # pad the anyres patch lists as the processor does
    pixel_values = torch.stack([torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, patches - p.shape[0])) for p in pixel_values])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "image_sizes": torch.stack(sizes)}


def _vision(inputs):
    return {k: inputs[k] for k in ("pixel_values", "image_sizes") if k in inputs}


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(c))
def wrapped(request):
    return _wrap(*request.param)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_understanding_logits_equal_the_vlm(wrapped, dtype):
    vlm, model = wrapped
    model.to(dtype)
    try:
        inputs = _inputs(vlm, model, [[IMAGES[0]], [IMAGES[1], IMAGES[2]]], ["what colour is it", "which is bigger?"])
        mask = inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: the positions generate uses
        with torch.no_grad():
            expected = vlm(**inputs, position_ids=positions).logits
            got = model(inputs["input_ids"], attention_mask=mask, position_ids=positions, **_vision(inputs)).logits
        vocab = expected.shape[-1]
        assert got.shape[-1] == vocab + 2
        assert got.dtype == expected.dtype == dtype
        real = mask.bool()
        assert torch.equal(got[..., :vocab][real], expected[real])
    finally:
        model.to(torch.float32)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "recompute"])
def test_greedy_answers_equal_vlm_generate(wrapped, use_cache):
    """Left-padded batch, two images in one prompt, KV-cached decoding (and the uncached reference)."""
    from lmfusion.sampling.text import Context, TokenPicker, decode, eos_ids, vocabulary_mask

    vlm, model = wrapped
    inputs = _inputs(vlm, model, [[IMAGES[0]], [IMAGES[1], IMAGES[2]]], ["what colour is it", "which is bigger?"])
    with torch.no_grad():
        expected = vlm.generate(**inputs, max_new_tokens=10, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    rows = [ids[m.bool()].tolist() for ids, m in zip(inputs["input_ids"], inputs["attention_mask"])]
    context = Context.from_tokens(model, rows, use_cache=use_cache, vision=_vision(inputs))
    got = decode(context, 10, TokenPicker(), vocabulary_mask(model), eos_ids(model, base_only=True))
    eos = vlm.generation_config.eos_token_id
    for row, new in zip(expected.tolist(), got):
        cut = row.index(eos) + 1 if eos in row else len(row)  # HF pads finished rows; decode stops
        assert new == row[:cut]
    assert any(len(set(new)) > 2 for new in got), "degenerate decoding would make this check weak"


def test_training_the_generation_side_leaves_the_vlm_untouched():
    vlm, model = _wrap("llava_next", "clip")
    before = weights_hash(vlm)
    inputs = _inputs(vlm, model, [[IMAGES[1]]], ["what is it"])
    with torch.no_grad():
        reference = vlm(**inputs).logits
    builder = SequenceBuilder(model.tokenizer, model.boi_token_id, model.eoi_token_id, model.config.tokens_per_image)
    batch = builder.collate([builder.text_then_image("a red circle"), builder.image_then_text("a blue square")],
                            torch.randn(2, 3, 16, 16))
    model.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    watched = model.image_layers[0].q_proj.weight.detach().clone()
    for step in range(3):
        loss = model.loss(batch, torch.Generator().manual_seed(step)).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in vlm.parameters())
        optimizer.step()
    model.eval()
    assert not torch.equal(watched, model.image_layers[0].q_proj.weight)
    assert weights_hash(vlm) == before
    with torch.no_grad():
        got = model(inputs["input_ids"], **_vision(inputs)).logits
    assert torch.equal(got[..., :reference.shape[-1]], reference)


def test_saved_vlm_folder_loads_with_processor_and_checks_its_hash(tmp_path):
    from lmfusion.testing import save_tiny_vlm

    folder = save_tiny_vlm(tmp_path / "vlm", "llava", "clip")
    model = LMFusionModel.from_text_model(str(folder), tiny_lmfusion_config(str(folder))).eval()
    assert model.is_vlm and model.processor is not None
    assert model.config.base_model_hash == weights_hash(model.text_model)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = LMFusionModel.from_pretrained(tmp_path / "adapter")
    assert reloaded.is_vlm and reloaded.processor is not None
    assert all(not k.startswith("text_model.") for k in reloaded.adapter_state_dict())


def test_unsupported_vlms_and_modes_are_refused_clearly():
    with pytest.raises(ValueError, match="M-RoPE"):
        check_supported(Qwen2VLConfig())
    vlm, processor = tiny_vlm("llava")
    with pytest.raises(ValueError, match="VLM base stays frozen"):
        LMFusionModel(vlm, tiny_lmfusion_config(mode="dense"))


def test_pixel_values_on_a_text_base_are_refused(tiny_base):
    model = LMFusionModel.from_text_model(str(tiny_base), tiny_lmfusion_config(str(tiny_base)))
    with pytest.raises(ValueError, match="base is a text LM"):
        model(torch.tensor([[5, 6]]), pixel_values=torch.zeros(1, 3, 32, 32))
