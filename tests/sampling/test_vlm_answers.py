"""Questions about images on a VLM base: the pipeline, `lmfusion caption --question` and `lmfusion chat --image`."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lmfusion.cli import main
from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.sampling import LMFusionPipeline
from lmfusion.sampling.understanding import DEFAULT_CAPTION_QUESTION, answer, answer_batch
from lmfusion.testing import save_tiny_vlm, tiny_lmfusion_config

RED = Image.new("RGB", (40, 28), (200, 30, 40))
BLUE = Image.new("RGB", (32, 32), (20, 30, 220))


@pytest.fixture(scope="module")
def vlm_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    folder = save_tiny_vlm(root / "llava")
    torch.manual_seed(0)
    model = LMFusionModel.from_text_model(str(folder), tiny_lmfusion_config(str(folder))).eval()
    model.save_pretrained(root / "ckpt")
    RED.save(root / "red.png")
    BLUE.save(root / "blue.png")
    return model, root


def test_pipeline_caption_on_a_vlm_base_is_the_vlm_describing_it(vlm_checkpoint):
    model, _ = vlm_checkpoint
    pipe = LMFusionPipeline(model)
    assert pipe.caption([RED, BLUE], max_new_tokens=10) == answer_batch(
        model, [[RED], [BLUE]], [DEFAULT_CAPTION_QUESTION] * 2, max_new_tokens=10)
    assert pipe.answer(RED, "What colour?", max_new_tokens=10) == answer(model, RED, "What colour?", max_new_tokens=10)


def test_bad_questions_are_refused(vlm_checkpoint, tiny_base):
    model, _ = vlm_checkpoint
    with pytest.raises(ValueError, match="question is empty"):
        answer(model, RED, "  ")
    text_model = LMFusionModel.from_text_model(str(tiny_base), tiny_lmfusion_config(str(tiny_base)))
    with pytest.raises(ValueError, match="needs a VLM base"):
        answer(text_model, RED, "What colour?")


def test_caption_question_and_chat_image_commands(vlm_checkpoint, tmp_path, capsys):
    model, root = vlm_checkpoint
    common = ["--checkpoint", str(root / "ckpt"), "--max-new-tokens", "10", "--device", "cpu"]
    assert main(["caption", *common, "--image", str(root / "red.png"), "--question", "What colour is the shape?"]) == 0
    assert capsys.readouterr().out.strip() == answer(model, RED, "What colour is the shape?", max_new_tokens=10)

    assert main(["chat", *common, "--image", str(root / "red.png"), str(root / "blue.png"),
                 "--prompt", "Which one is red?", "--out", str(tmp_path / "chat")]) == 0
    expected = answer(model, [RED, BLUE], "Which one is red?", max_new_tokens=10)
    assert capsys.readouterr().out.strip() == expected
    assert expected in (tmp_path / "chat" / "chat.md").read_text()


def test_a_text_base_refuses_a_question_in_one_line(tiny_base, tmp_path, capsys):
    model = LMFusionModel.from_text_model(str(tiny_base), tiny_lmfusion_config(str(tiny_base)))
    model.save_pretrained(tmp_path / "ckpt")
    RED.save(tmp_path / "red.png")
    assert main(["caption", "--checkpoint", str(tmp_path / "ckpt"), "--image", str(tmp_path / "red.png"),
                 "--question", "What colour?", "--device", "cpu"]) == 2
    assert "base is a text LM" in capsys.readouterr().err


def test_an_image_appended_as_the_vlm_reads_it_equals_the_processor_prompt(vlm_checkpoint):
    from lmfusion.sampling.text import Context
    from lmfusion.sampling.understanding import vlm_inputs

    model, _ = vlm_checkpoint
    (full,), vision = vlm_inputs(model, [[RED]], ["What colour?"])
    image_id = model.text_model.config.image_token_id
    first, last = full.index(image_id), len(full) - full[::-1].index(image_id)
    whole = Context.from_tokens(model, [full], vision=vision)
    pieces = Context.from_tokens(model, [full[:first]])
    pieces.append_vlm_image([RED], model.processor)
    pieces.append_tokens(torch.tensor([full[last:]]))
    assert pieces.ids[0].tolist() == full
    torch.testing.assert_close(pieces.logits, whole.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("image_context", ["latents", "vlm", "both"])
def test_a_drawn_image_enters_the_context_as_asked(vlm_checkpoint, image_context):
    model, _ = vlm_checkpoint
    pipe = LMFusionPipeline(model)
    saved = model.special_head.weight.detach().clone()
    with torch.no_grad():  # make BOI the first pick, so the session draws at once
        model.special_head.weight[0] = model.text_model.get_output_embeddings().weight.abs().sum(0) * 1e3
    try:
        session = pipe.chat(max_new_tokens=3, max_images=1, steps=2, guidance_scale=1.0, image_context=image_context,
                            progress=False)
        parts = session.send("Draw a red circle.")
    finally:
        with torch.no_grad():
            model.special_head.weight.copy_(saved)
    assert sum(not isinstance(p, str) for p in parts) == 1
    ids = session.context.ids[0]
    placeholders = int((ids == model.text_model.config.image_token_id).sum())
    latent_rows = int(session.context.image_mask[0].sum())
    assert (placeholders > 0) == (image_context != "latents")
    assert (latent_rows == model.config.tokens_per_image) == (image_context != "vlm")
    if image_context != "latents":
        assert placeholders == session._vlm_tokens_per_image()


def test_vlm_image_context_needs_a_vlm_base(tiny_base):
    from lmfusion.sampling.interleaved import InterleavedSession

    model = LMFusionModel.from_text_model(str(tiny_base), tiny_lmfusion_config(str(tiny_base)))
    with pytest.raises(ValueError, match="needs a VLM base"):
        InterleavedSession(model, image_context="vlm", codec=None)
