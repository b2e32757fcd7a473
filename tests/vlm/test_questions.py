"""Shapes questions: every answer is what the renderer drew, read back from the image itself."""

from __future__ import annotations

import pytest

from lmfusion.data.shapes import generate_shapes_dataset
from lmfusion.data.shapes_oracle import parse_shapes_image
from lmfusion.vlm.questions import (
    CENTRE_PHRASE, QUESTIONS, answer, folder_scenes, generated_scenes, position_phrase, question_kind,
)


def test_answers_match_what_the_rendered_image_shows():
    scenes = generated_scenes(seed=3, count=40)
    for scene in scenes:
        (seen,) = parse_shapes_image(scene.image)  # the oracle reads the pixels, not the records
        assert answer("colour", scene.objects) == seen.colour
        assert answer("shape", scene.objects) == seen.shape
        assert answer("size", scene.objects) == seen.size
        assert answer("caption", scene.objects).startswith(f"a {seen.size} {seen.colour} {seen.shape}")


def test_position_answer_is_the_captions_phrase_and_the_centre_has_one():
    scenes = generated_scenes(seed=0, count=60)
    centre = 0
    for scene in scenes:
        caption, where = answer("caption", scene.objects), answer("position", scene.objects)
        if where == CENTRE_PHRASE:
            centre += 1
            assert len(caption.split()) == 4  # the caption says nothing for the centre cell
        else:
            assert caption.endswith(" " + where)
    assert 0 < centre < len(scenes)


def test_bad_questions_and_ambiguous_scenes_are_refused():
    with pytest.raises(ValueError, match="unknown question"):
        question_kind("What is the meaning of life?")
    with pytest.raises(ValueError, match="unknown question kind"):
        answer("texture", [{"shape": "circle", "colour": "red", "size": "small", "x": 0.5, "y": 0.5}])
    two = [{"shape": "circle", "colour": "red", "size": "small", "x": 0.2, "y": 0.5},
           {"shape": "square", "colour": "blue", "size": "large", "x": 0.8, "y": 0.5}]
    with pytest.raises(ValueError, match="single-object"):
        answer("colour", two)
    assert answer("caption", two, "to the left of") == "a small red circle to the left of a large blue square"
    assert [question_kind(q) for q in QUESTIONS.values()] == list(QUESTIONS)


def test_a_shapes_folder_gives_the_same_scenes_as_the_generator(tmp_path):
    generate_shapes_dataset(tmp_path / "shapes", 6, seed=5, progress=False, two_object_prob=0.0)
    from_folder = folder_scenes(tmp_path / "shapes")
    generated = generated_scenes(seed=5, count=6)
    assert [s.objects for s in from_folder] == [s.objects for s in generated]
    assert from_folder[0].image.tobytes() == generated[0].image.tobytes()
    assert position_phrase(from_folder[0].objects[0]) == answer("position", generated[0].objects)
    with pytest.raises(FileNotFoundError, match="not found"):
        folder_scenes(tmp_path / "missing")
