"""Text decoding: base-model greedy equality, cached captioning = recomputed captioning."""

import pytest
import torch
from PIL import Image

from lmfusion.data.images import to_pil
from lmfusion.sampling.text import Context, TokenPicker, caption, generate_text, generate_text_ids


def _images(n=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 16, 16, generator=generator) * 255).round() / 255  # exactly representable in a PNG


def test_generate_text_equals_base_greedy_generate(model):
    ids = model.tokenizer("a small red circle above").input_ids
    expected = model.text_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):]
    got = generate_text_ids(model, ids, max_new_tokens=24)
    assert got == expected.tolist()
    assert len(set(got)) > 3  # the fixture base does not just repeat one token
    assert generate_text(model, "a small red circle above", max_new_tokens=24) == model.tokenizer.decode(
        expected, skip_special_tokens=True
    )


def test_generate_text_never_picks_boi_or_eoi(model):
    with torch.no_grad():
        model.special_head.weight.mul_(100.0)  # make BOI/EOI the top logits
    try:
        ids = generate_text_ids(model, model.tokenizer("a small").input_ids, max_new_tokens=8)
    finally:
        with torch.no_grad():
            model.special_head.weight.div_(100.0)
    assert all(token < model.text_vocab_size for token in ids)


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(model):
    ids = model.tokenizer("a purple square").input_ids
    first = generate_text_ids(model, ids, 12, temperature=1.0, seed=3)
    assert first == generate_text_ids(model, ids, 12, temperature=1.0, seed=3)
    assert first != generate_text_ids(model, ids, 12, temperature=5.0, seed=4)
    assert generate_text_ids(model, ids, 12, temperature=1.0, top_p=1e-6, seed=5) == generate_text_ids(model, ids, 12)


@pytest.mark.parametrize("options", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5)])
def test_bad_decoding_options(options):
    with pytest.raises(ValueError):
        TokenPicker(**options)


def test_caption_context_logits_cached_equal_recomputed(model, pixel_codec):
    """Step by step, the next-token logits after BOI [image] EOI + text match a full recompute."""
    latents = pixel_codec.encode(_images())
    contexts = [Context.from_tokens(model, [[model.boi_token_id]] * 2, use_cache=flag) for flag in (True, False)]
    for context in contexts:
        context.append_image(latents)
    for token in [5, 17, 42, 9]:
        assert (contexts[0].logits - contexts[1].logits).abs().max() < 1e-4
        for context in contexts:
            context.append_tokens(torch.tensor([[token], [token + 1]]))
    assert contexts[0].cache.get_seq_length() == contexts[0].length == 1 + model.config.tokens_per_image + 1 + 4


def test_caption_with_cache_equals_without(model, pixel_codec):
    images = _images()
    fast = caption(model, images, max_new_tokens=16, codec=pixel_codec)
    slow = caption(model, images, max_new_tokens=16, codec=pixel_codec, use_cache=False)
    assert fast == slow and len(fast) == 2 and all(fast)
    sampled = caption(model, images, max_new_tokens=16, temperature=1.0, seed=0, codec=pixel_codec)
    assert sampled == caption(model, images, max_new_tokens=16, temperature=1.0, seed=0, codec=pixel_codec, use_cache=False)


def test_batched_captions_equal_single_captions(model, pixel_codec):
    images = _images()
    batched = caption(model, images, max_new_tokens=12, codec=pixel_codec)
    assert batched == [caption(model, image, max_new_tokens=12, codec=pixel_codec) for image in images]


def test_caption_depends_on_the_image(model, pixel_codec):
    context_a, context_b = (Context.from_tokens(model, [[model.boi_token_id]]) for _ in range(2))
    context_a.append_image(pixel_codec.encode(_images(1, seed=0)))
    context_b.append_image(pixel_codec.encode(_images(1, seed=1)))
    assert not torch.allclose(context_a.logits, context_b.logits)


def test_caption_accepts_path_pil_and_tensor(model, pixel_codec, tmp_path):
    image = _images(1)[0]
    path = tmp_path / "image.png"
    to_pil(image).save(path)
    from_tensor = caption(model, image, max_new_tokens=8, codec=pixel_codec)
    assert isinstance(from_tensor, str)
    assert caption(model, str(path), max_new_tokens=8, codec=pixel_codec) == from_tensor
    assert caption(model, Image.open(path), max_new_tokens=8, codec=pixel_codec) == from_tensor
    assert caption(model, [path, path], max_new_tokens=8, codec=pixel_codec) == [from_tensor] * 2


def test_caption_rejects_bad_images(model, pixel_codec, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad image"):
        caption(model, broken, codec=pixel_codec)
    with pytest.raises(ValueError, match="shape"):
        caption(model, torch.rand(3, 8, 8), codec=pixel_codec)
