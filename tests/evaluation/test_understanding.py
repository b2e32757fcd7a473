"""Caption scoring: parsed shapes captions compared attribute by attribute with the drawn scene."""

import pytest

from lmfusion.evaluation.cider import cider_d
from lmfusion.evaluation.understanding import blind_cider, caption_metrics, caption_scene_scores

PAIR = [{"shape": "circle", "colour": "red", "size": "small", "x": 0.5, "y": 0.2},
        {"shape": "square", "colour": "blue", "size": "large", "x": 0.5, "y": 0.8}]
SINGLE = [{"shape": "triangle", "colour": "green", "size": "large", "x": 0.15, "y": 0.5}]


def test_a_correct_caption_is_all_correct():
    scores = caption_scene_scores("a large green triangle on the left", SINGLE)
    assert scores["all_correct"] and scores["parsed"] and scores["position"] == 1.0


def test_a_pair_described_the_other_way_round_is_still_correct():
    assert caption_scene_scores("a small red circle above a large blue square", PAIR, "above")["all_correct"]
    assert caption_scene_scores("a large blue square below a small red circle", PAIR, "above")["all_correct"]


@pytest.mark.parametrize(
    "caption, wrong",
    [("a large red triangle on the left", "colour"), ("a large green circle on the left", "shape"),
     ("a small green triangle on the left", "size"), ("a large green triangle on the right", "position")],
)
def test_each_wrong_attribute_is_attributed(caption, wrong):
    scores = caption_scene_scores(caption, SINGLE)
    assert scores[wrong] == 0.0 and not scores["all_correct"]
    assert all(scores[a] == 1.0 for a in ("shape", "colour", "size", "position") if a != wrong)


def test_relation_inferred_from_positions_when_not_stored():
    assert caption_scene_scores("a small red circle above a large blue square", PAIR)["position"] == 1.0
    assert caption_scene_scores("a small red circle below a large blue square", PAIR)["position"] == 0.0


def test_unparseable_or_wrong_count_scores_zero():
    assert caption_scene_scores("\ufffd\ufffd", SINGLE) == {
        "shape": 0.0, "colour": 0.0, "size": 0.0, "position": 0.0, "parsed": False, "all_correct": False}
    assert caption_scene_scores("a small red circle above a large blue square", SINGLE)["parsed"]
    assert not caption_scene_scores("a small red circle above a large blue square", SINGLE)["all_correct"]


def test_caption_metrics_combines_cider_exact_and_scene():
    references = ["a large green triangle on the left", "a small red circle above a large blue square"]
    metas = [{"objects": SINGLE}, {"objects": PAIR, "relation": "above"}]
    perfect = caption_metrics(references, references, metas)
    assert perfect["exact_match"] == 1.0 and perfect["scene"]["all_correct"] == 1.0
    assert perfect["cider"] > 0 and len(perfect["per_image_cider"]) == 2
    half = caption_metrics(["nonsense", references[1]], references, metas)
    assert half["exact_match"] == 0.5 and half["scene"]["all_correct"] == 0.5


def test_blind_captioner_is_the_best_constant_caption_and_a_reader_beats_it():
    references = ["a small red circle on the left", "a small red circle on the right", "a large blue square on the left",
                  "a small green triangle at the top", "a large red circle at the bottom"]
    blind = blind_cider(references)
    constants = [cider_d([c] * len(references), [[r] for r in references])[0] * 100 for c in references]
    assert blind == pytest.approx(max(constants)) and blind > 0
    reader = caption_metrics(references, references, [])
    collapsed = caption_metrics([references[0]] * len(references), references, [])
    assert reader["cider"] > blind >= collapsed["cider"]
    assert reader["distinct_captions"] == 5 and collapsed["distinct_captions"] == 1
    assert reader["blind_cider"] == pytest.approx(blind)
