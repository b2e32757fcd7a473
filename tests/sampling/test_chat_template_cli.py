"""`lmfusion chat --chat-template`: each prompt is sent as a user turn in the base's template, as chat training lays it out."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from lmfusion.cli import main
from lmfusion.data.shapes_chat import render_user_turn, user_turn_ids
from lmfusion.sampling.text import generate_text_ids
from lmfusion.testing import save_peaky_base, tiny_sampling_model

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    base = save_peaky_base(tmp_path_factory.mktemp("templated") / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(base)
    model = tiny_sampling_model(base)
    model.save_pretrained(base.parent / "model")
    return model, base.parent / "model"


def test_the_prompt_goes_in_as_a_templated_user_turn(templated, tmp_path, capsys):
    model, checkpoint = templated
    assert render_user_turn(model.tokenizer, "Draw a cat.") == "<|user|>Draw a cat.\n<|assistant|>"
    code = main(["chat", "--checkpoint", str(checkpoint), "--chat-template", "--prompt", "Draw a cat.", "--out",
                 str(tmp_path / "out"), "--max-new-tokens", "5", "--steps", "1"])
    stdout = capsys.readouterr().out.strip()
    # an untrained BOI row never wins: the reply is the base's greedy reply to the rendered turn
    base = generate_text_ids(model, user_turn_ids(model.tokenizer, "Draw a cat."), 5)
    assert code == 0 and stdout == model.tokenizer.decode(base, skip_special_tokens=True).strip()
    plain = generate_text_ids(model, list(model.tokenizer("Draw a cat.", add_special_tokens=False).input_ids), 5)
    assert plain != base  # the template changed what the model was asked
