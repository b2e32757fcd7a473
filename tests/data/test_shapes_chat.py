"""lmfusion data shapes-chat: the three kinds, a held-out split with unseen wording, the base's own replies."""

from __future__ import annotations

import re

import pytest
import torch

from lmfusion.base_models import load_text_model
from lmfusion.cli import main
from lmfusion.data.shapes_chat import (DRAW_PHRASES, TEXT_QUESTIONS, make_request, read_chat_rows, render_user_turn,
                                       user_turn_ids)
from lmfusion.data.shapes_oracle import parse_shapes_image
from lmfusion.data.images import load_rgb_image


def _frame(template: str) -> str:
    return template.replace("{c}", "").strip()


def test_test_requests_use_phrasings_and_questions_training_never_shows():
    train = [make_request(0, i, heldout=False) for i in range(300)]
    test = [make_request(0, i, heldout=True) for i in range(300)]
    train_users = {r["user"] for r in train}
    assert {r["phrasing"] for r in train} == {"seen"}
    groups = {r["phrasing"] for r in test if r["kind"] != "text"}
    assert groups == {"seen", "unseen_phrasing", "unseen_paraphrase"}
    seen_frames = [re.escape(t).replace(re.escape("{c}"), ".*") for t in DRAW_PHRASES["seen"]]
    for row in test:
        if row["kind"] == "text":  # held-out questions come from templates training never uses
            assert row["user"] not in train_users
        elif row["phrasing"] != "seen":  # an unseen frame cannot be read as any training frame
            assert not any(re.fullmatch(f, row["user"]) for f in seen_frames), row["user"]
    paraphrases = [r["user"] for r in test if r["phrasing"] == "unseen_paraphrase"]
    assert paraphrases and not any(re.search(r"\b(draw|picture|show)\b", u, re.I) for u in paraphrases)
    assert all(t not in TEXT_QUESTIONS["train"] for t in TEXT_QUESTIONS["test"])


def test_generated_rows_have_exact_images_and_the_bases_greedy_replies(tmp_path, tiny_base):
    out = tmp_path / "chat"
    assert main(["data", "shapes-chat", "--out", str(out), "--count", "9", "--base-model", str(tiny_base),
                 "--size", "32", "--reply-tokens", "5", "--lead-in-tokens", "3", "--test-fraction", "0.34"]) == 0
    rows = read_chat_rows(out / "train" / "chat.jsonl")
    assert [r["kind"] for r in rows] == ["draw", "draw_edit", "text"] * 2
    model, tokenizer = load_text_model(str(tiny_base))
    for row in rows:
        if row["kind"] == "text":  # the stored reply is the base's greedy continuation of the rendered turn
            ids = torch.tensor([user_turn_ids(tokenizer, row["user"])])
            greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
            assert row["reply"] == tokenizer.decode(greedy, skip_special_tokens=True)
            continue
        for name, objects in zip(row["images"], row["objects"]):  # each image shows its records
            found = parse_shapes_image(load_rgb_image(out / "train" / name, 32))
            assert [(d.shape, d.colour) for d in found] == [(o["shape"], o["colour"]) for o in objects]
        if row["kind"] == "draw_edit":
            assert row["objects"][0] != row["objects"][1]  # the second image is the first, edited


def test_the_chat_template_renders_the_user_turn_when_the_base_has_one():
    class Templated:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert add_generation_prompt and not tokenize
            return f"<user>{messages[0]['content']}</user><assistant>"

    assert render_user_turn(Templated(), "Draw a cat.") == "<user>Draw a cat.</user><assistant>"
    assert render_user_turn(object(), "Draw a cat.") == "Draw a cat."


def test_bad_arguments_are_one_line_errors(tmp_path, tiny_base, capsys):
    assert main(["data", "shapes-chat", "--out", str(tmp_path / "x"), "--count", "0", "--base-model", str(tiny_base)]) != 0
    assert "count must be at least 1" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"kind": "draw", "user": "Draw.", "images": []}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: a draw row needs 1 images"):
        read_chat_rows(tmp_path / "bad.jsonl")



def test_no_training_question_is_a_hand_written_held_out_one():
    from itertools import product

    from lmfusion.data.shapes import COLOURS, SHAPES
    from lmfusion.evaluation.chat import freeform_questions

    held_out = {q.lower() for q in freeform_questions()}
    assert len(held_out) >= 30
    written = {template.format(shape=shape, colour=colour).lower()  # every filling of every template
               for template, shape, colour in product(TEXT_QUESTIONS["train"], SHAPES, COLOURS)}
    assert len(written) > 40
    assert not held_out & written
