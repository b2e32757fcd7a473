"""CIDEr-D: the port agrees with pycocoevalcap 1.2 and behaves as a captioning metric should."""

import pytest

from lmfusion.evaluation.cider import cider_d, exact_match, simple_tokenize

SHAPES_CANDIDATES = ["a small red circle above a large blue square", "a large green triangle on the left",
                     "a small yellow square", "a large purple circle at the top"]
SHAPES_REFERENCES = [["a small red circle above a large blue square"], ["a large green triangle on the left"],
                     ["a small red triangle in the top right"], ["a large purple circle in the bottom left"]]
COCO_CANDIDATES = ["a dog runs on the grass", "two cats sleep on a sofa", "a man rides a red bike"]
COCO_REFERENCES = [["a dog running on grass", "the dog runs across a field"],
                   ["two cats sleeping on a couch", "cats asleep on the sofa"],
                   ["a person riding a bicycle", "a man on a red bike in the street"]]


def test_matches_pycocoevalcap_reference_values():
    # Computed with pycocoevalcap 1.2's CiderScorer on the same (simply tokenised) inputs.
    score, per_image = cider_d(SHAPES_CANDIDATES, SHAPES_REFERENCES)
    assert score == pytest.approx(5.9604633007879055, abs=1e-12)
    assert per_image == pytest.approx([10.0, 10.0, 0.344344, 3.497509], abs=1e-6)
    score, per_image = cider_d(COCO_CANDIDATES, COCO_REFERENCES)
    assert score == pytest.approx(1.7505913954044432, abs=1e-12)
    assert per_image == pytest.approx([2.06918, 1.680107, 1.502487], abs=1e-6)


def test_identical_captions_score_high_and_unrelated_zero():
    references = [[c] for c in SHAPES_CANDIDATES]
    score, per_image = cider_d(SHAPES_CANDIDATES, references)
    assert score == pytest.approx(10.0) and all(s == pytest.approx(10.0) for s in per_image)
    unrelated, _ = cider_d(["zebra xylophone quantum", "purple monkey dishwasher", "lorem ipsum dolor"],
                           [["a small red circle"], ["a large blue square"], ["a green triangle on the left"]])
    assert unrelated == 0.0


def test_partial_overlap_scores_between():
    references = [[c] for c in SHAPES_CANDIDATES]
    near = ["a small red circle above a large green square"] + SHAPES_CANDIDATES[1:]
    score, per_image = cider_d(near, references)
    assert 0.0 < per_image[0] < 10.0 and score < 10.0


def test_tokenisation_ignores_case_and_punctuation():
    assert simple_tokenize("A small, RED circle.") == "a small red circle"
    a, _ = cider_d(["A small, RED circle.", "a blue square"], [["a small red circle"], ["a blue square"]])
    b, _ = cider_d(["a small red circle", "a blue square"], [["a small red circle"], ["a blue square"]])
    assert a == b


def test_exact_match():
    assert exact_match(["A red circle.", "a blue square"], [["a red circle"], ["a green square", "x"]]) == 0.5
    assert exact_match([], []) == 0.0


def test_bad_input_is_rejected():
    with pytest.raises(ValueError):
        cider_d(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        cider_d([], [])
    with pytest.raises(ValueError):
        cider_d(["a"], [[]])
