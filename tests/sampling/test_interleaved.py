"""Interleaved generation: BOI switches to diffusion on the running cache, then text resumes."""

import pytest
import torch
from PIL import Image

from lmfusion.sampling.image import sample_latents
from lmfusion.sampling.interleaved import InterleavedSession, MarkdownTranscript, generate_interleaved, pick_token
from lmfusion.sampling.text import TokenPicker

OPTIONS = dict(steps=2, seed=7, progress=False)


@pytest.fixture(scope="module")
def eager_model(make_model):
    """A model whose BOI logit is huge: it opens an image whenever it is allowed to."""
    model = make_model()
    logits = model.text_logits
    boost = torch.zeros(model.text_vocab_size + 2)
    boost[model.boi_token_id] = 1e4
    model.text_logits = lambda hidden: logits(hidden) + boost.to(hidden.dtype)
    return model


@pytest.fixture(scope="module")
def narrow_model(make_model):
    """A model whose BOI logit sits just above the top text token: the single most likely token,
    yet p(BOI) < 1/2, since a tiny random model spreads the text's probability over many tokens."""
    model = make_model()
    logits, vocab = model.text_logits, model.text_vocab_size

    def narrow(hidden):
        out = logits(hidden).clone()
        out[..., model.boi_token_id] = out[..., :vocab].max(-1).values + 0.5
        return out

    model.text_logits = narrow
    return model


def test_pick_token_draws_on_the_top_token_or_on_more_than_half_the_mass():
    greedy, boi = TokenPicker(), 4
    narrow = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.5])  # BOI on top, but p(BOI) = 0.29
    assert pick_token(narrow, greedy, boi, "token") == boi and pick_token(narrow, greedy, boi, "mass") == 0
    clear = torch.tensor([1.0, 1.0, 1.0, 1.0, 3.0])  # p(BOI) = 0.65
    assert pick_token(clear, greedy, boi, "token") == boi == pick_token(clear, greedy, boi, "mass")
    banned = torch.tensor([1.0, float("-inf"), float("-inf"), float("-inf"), 1.5])  # disallowed: no mass
    assert pick_token(banned, greedy, boi, "mass") == boi  # p(BOI) = 0.62 among what may be picked


def test_greedy_chat_draws_only_when_drawing_is_likelier_than_writing(narrow_model, pixel_codec):
    by_token = generate_interleaved(narrow_model, "a small red", max_new_tokens=4, max_images=1, codec=pixel_codec,
                                    draw_decision="token", **OPTIONS)
    assert isinstance(by_token[0], Image.Image)
    by_mass = generate_interleaved(narrow_model, "a small red", max_new_tokens=4, codec=pixel_codec, **OPTIONS)
    assert by_mass and all(isinstance(p, str) for p in by_mass)
    with pytest.raises(ValueError, match="draw_decision must be one of"):
        InterleavedSession(narrow_model, codec=pixel_codec, draw_decision="sometimes")


def _session(model, codec, **options):
    return InterleavedSession(model, codec=codec, **{**OPTIONS, **options})


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_image_then_text_and_image_equals_text_to_image(eager_model, pixel_codec, guidance_scale):
    session = _session(eager_model, pixel_codec, max_images=1, max_new_tokens=6, guidance_scale=guidance_scale)
    parts = session.send("a red circle")
    assert isinstance(parts[0], Image.Image) and parts[0].size == (16, 16)
    assert len(parts) == 2 and isinstance(parts[1], str) and parts[1]
    # the image was sampled from exactly the text-to-image layout: prompt + BOI
    expected = sample_latents(eager_model, "a red circle", guidance_scale=guidance_scale, **OPTIONS)
    assert (session.context.images[0][0] - expected[0]).abs().max() < 1e-4
    # ... and sits in the context clean, followed by EOI, then the text
    context = session.context
    boi = context.ids[0].tolist().index(eager_model.boi_token_id)
    tokens_per_image = eager_model.config.tokens_per_image
    assert context.image_mask[0, boi + 1 : boi + 1 + tokens_per_image].all()
    assert context.ids[0, boi + 1 + tokens_per_image] == eager_model.eoi_token_id
    assert context.cache.get_seq_length() == context.length


def test_max_images_is_respected(eager_model, pixel_codec):
    parts = generate_interleaved(eager_model, "a red circle", max_images=2, max_new_tokens=5, codec=pixel_codec, **OPTIONS)
    assert sum(isinstance(p, Image.Image) for p in parts) == 2
    assert isinstance(parts[-1], str)
    text_only = generate_interleaved(eager_model, "a red circle", max_images=0, max_new_tokens=5, codec=pixel_codec, **OPTIONS)
    assert all(isinstance(p, str) for p in text_only)


def test_plain_model_writes_text_like_generate_text(model, pixel_codec):
    """Without BOI, interleaved decoding is text decoding after the (BOS-less) prompt."""
    from lmfusion.sampling.text import generate_text_ids

    parts = generate_interleaved(model, "a small red", max_new_tokens=10, codec=pixel_codec, **OPTIONS)
    ids = model.tokenizer("a small red", add_special_tokens=False).input_ids
    new = generate_text_ids(model, ids, 10)
    assert "".join(p for p in parts if isinstance(p, str)) == model.tokenizer.decode(
        [t for t in new if t < model.text_vocab_size], skip_special_tokens=True
    )


def test_session_keeps_the_context_between_turns(eager_model, pixel_codec):
    session = _session(eager_model, pixel_codec, max_images=1, max_new_tokens=3)
    session.send("a red circle")
    length = session.context.length
    parts = session.send("and a blue square")
    assert session.context.length > length
    assert sum(len(images) for images in session.context.images) == 2
    assert isinstance(parts[0], Image.Image)


def test_empty_prompt_is_rejected(model, pixel_codec):
    with pytest.raises(ValueError, match="empty"):
        generate_interleaved(model, "  ", codec=pixel_codec, **OPTIONS)


def test_markdown_transcript(tmp_path):
    transcript = MarkdownTranscript(tmp_path / "chat")
    saved = transcript.add_turn("draw", ["Here:", Image.new("RGB", (4, 4)), "done"])
    assert [p.name for p in saved] == ["image_001.png"]
    text = transcript.path.read_text()
    assert "**User:** draw" in text and "![image 1](image_001.png)" in text and "done" in text
    assert Image.open(saved[0]).size == (4, 4)
