"""lmfusion eval --task chat: F1 / false draws / image counts on hand-made outcomes, then real runs."""

from __future__ import annotations

import json

import pytest
import torch

from lmfusion.cli import main
from lmfusion.data.shapes import render_scene
from lmfusion.data.shapes_chat import generate_shapes_chat
from lmfusion.evaluation.chat import (ChatEvalSettings, chat_metrics, evaluate_chat, f1, freeform_questions,
                                      image_matches)
from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.sampling.pipeline import LMFusionPipeline


def _draw(kind, phrasing, drawn, right):
    return {"kind": kind, "phrasing": phrasing, "drawn": drawn, "image_right": right}


def test_metrics_on_hand_made_outcomes():
    outcomes = [
        _draw("draw", "seen", 1, [1.0]), _draw("draw", "seen", 0, [0.0]),  # one hit, one miss
        _draw("draw_edit", "unseen_paraphrase", 2, [1.0, 0.0]), _draw("draw_edit", "unseen_paraphrase", 1, [1.0, 0.0]),
        {"kind": "text", "phrasing": "unseen", "drawn": 0, "identical": True},
        {"kind": "text", "phrasing": "unseen", "drawn": 1, "identical": False},  # a false draw
        {"kind": "text", "phrasing": "unseen", "drawn": 0, "identical": True},
        {"kind": "text", "phrasing": "unseen", "drawn": 0, "identical": False},
    ]
    m = chat_metrics(outcomes)
    assert m["boi_f1"]["seen"]["f1"] == pytest.approx(f1(1, 1, 1)) == pytest.approx(0.5)
    assert m["boi_f1"]["unseen_paraphrase"]["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1))  # both drew; one false draw
    assert m["boi_f1"]["all"]["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert "unseen_phrasing" not in m["boi_f1"]  # no rows, no figure
    assert m["false_draw_rate"] == 0.25
    assert m["image_count"] == {"all": 0.5, "draw": 0.5, "draw_edit": 0.5}
    assert m["image_right"] == {"draw image 1": 0.5, "draw_edit image 1": 1.0, "draw_edit image 2": 0.0}
    assert m["text_identical"] == 0.5
    assert f1(0, 0, 0) == 0.0
    assert "false_draw_freeform" not in m  # none asked, no figure


def test_hand_written_questions_are_scored_apart_from_the_f1():
    outcomes = [_draw("draw", "seen", 1, [1.0]), {"kind": "text", "phrasing": "unseen", "drawn": 0, "identical": True},
                {"kind": "text", "phrasing": "freeform", "drawn": 1, "identical": False},
                {"kind": "text", "phrasing": "freeform", "drawn": 0, "identical": True},
                {"kind": "text", "phrasing": "freeform", "drawn": 0, "identical": True},
                {"kind": "text", "phrasing": "freeform", "drawn": 0, "identical": False}]
    m = chat_metrics(outcomes)
    assert m["boi_f1"]["all"]["f1"] == 1.0 and m["false_draw_rate"] == 0.0  # the templates' figures, unchanged
    assert m["n"]["text"] == 1 and m["n"]["freeform"] == 4
    assert m["false_draw_freeform"] == 0.25 and m["text_identical_freeform"] == 0.5


def test_the_oracle_reads_the_asked_object_back():
    obj = {"shape": "circle", "colour": "red", "size": "large", "x": 0.5, "y": 0.5}
    assert image_matches(render_scene([obj], 64), [obj])
    assert not image_matches(render_scene([{**obj, "colour": "blue"}], 64), [obj])
    assert not image_matches(torch.rand(3, 64, 64), [obj])  # noise is no shapes picture


@pytest.fixture(scope="module")
def chat_set(tmp_path_factory, tiny_base):
    return generate_shapes_chat(tmp_path_factory.mktemp("chat_eval") / "set", 12, base_model=str(tiny_base), size=16,
                                reply_tokens=4, lead_in_tokens=0, test_fraction=0.5, progress=False)


def test_an_untrained_model_never_draws_and_replies_as_the_base(tmp_path, tiny_checkpoint, chat_set):
    out = tmp_path / "report"
    assert main(["eval", "--task", "chat", "--checkpoint", str(tiny_checkpoint), "--data", str(chat_set), "--out",
                 str(out), "--steps", "1", "--guidance-scale", "1", "--max-new-tokens", "4"]) == 0
    m = json.loads((out / "report.json").read_text())["metrics"]
    n_freeform = len(freeform_questions())
    assert m["n"] == {"text": 2, "draw": 2, "draw_edit": 2, "freeform": n_freeform}
    assert m["false_draw_rate"] == 0.0 and m["boi_f1"]["all"]["f1"] == 0.0 and m["image_count"]["all"] == 0.0
    assert m["text_identical"] == 1.0  # the frozen text path: the base's greedy reply, token for token
    assert m["false_draw_freeform"] == 0.0 and m["text_identical_freeform"] == 1.0
    assert "hand-written" in (out / "report.md").read_text()
    assert len((out / "replies.jsonl").read_text().splitlines()) == 6 + n_freeform


def test_a_model_that_always_draws_is_scored_as_such(tiny_checkpoint, chat_set):
    class AlwaysBOI(torch.nn.Module):  # BOI wins every step: every reply is images until max_images
        def __init__(self, hidden):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(2, hidden))

        def forward(self, hidden):
            return torch.tensor([1e4, -1e4], dtype=hidden.dtype).expand(*hidden.shape[:-1], 2)

    model = LMFusionModel.from_pretrained(tiny_checkpoint).eval()
    model.special_head = AlwaysBOI(model.special_head.weight.shape[1])
    settings = ChatEvalSettings(n=6, steps=1, guidance_scale=1, max_new_tokens=8, max_images=3, freeform=False)
    m = evaluate_chat("in-memory", chat_set, settings=settings, pipe=LMFusionPipeline(model), report=lambda _: None)["metrics"]
    assert m["false_draw_rate"] == 1.0 and m["text_identical"] == 0.0
    assert m["boi_f1"]["all"]["f1"] == pytest.approx(2 * 4 / (2 * 4 + 2))  # every request drew; both questions too
    assert m["image_count"]["all"] == 0.0  # three images each time: never the asked one or two


def test_bad_chat_eval_input_is_a_one_line_error(tmp_path, tiny_checkpoint, capsys):
    assert main(["eval", "--task", "chat", "--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path)]) != 0
    assert "no chat.jsonl" in capsys.readouterr().err
