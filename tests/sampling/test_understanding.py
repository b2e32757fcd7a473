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
