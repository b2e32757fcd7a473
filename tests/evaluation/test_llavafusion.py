"""The LLaVAFusion measurements on a tiny VLM: the VLM's answers survive the wrap, every part runs."""

from __future__ import annotations

import pytest
import torch

from lmfusion.evaluation.llavafusion import (
    accuracy, compare_replies, context_answers, generation_scores, lmfusion_replies, self_consistency)
from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.sampling.pipeline import LMFusionPipeline
from lmfusion.testing import save_tiny_vlm, tiny_lmfusion_config
from lmfusion.vlm.evaluate import ask, load_vlm
from lmfusion.vlm.questions import QUESTIONS, generated_scenes


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = save_tiny_vlm(tmp_path_factory.mktemp("vlm") / "llava")
    torch.manual_seed(0)
    model = LMFusionModel.from_text_model(str(folder), tiny_lmfusion_config(str(folder))).eval()
    return folder, LMFusionPipeline(model), generated_scenes(seed=3, count=4)


def test_answers_through_the_model_equal_the_vlm_folder_run_by_transformers(setup):
    folder, pipe, scenes = setup
    vlm, processor = load_vlm(folder)
    kinds = ["caption", "colour"]
    before = {k: ask(vlm, processor, [s.image for s in scenes], QUESTIONS[k]) for k in kinds}
    after = lmfusion_replies(pipe.model, scenes, kinds)
    assert compare_replies(before, after)["identical"]
    changed = {**after, "colour": ["nonsense"] + after["colour"][1:]}
    report = compare_replies(before, changed)
    assert not report["identical"] and report["different"] == int(before["colour"][0] != "nonsense")
    assert set(accuracy(after, scenes)) == set(kinds)


def test_generation_self_consistency_and_image_contexts_run(setup):
    _, pipe, scenes = setup
    scores, images = generation_scores(pipe, scenes, guidance_scale=2.0, steps=2)
    assert images.shape[0] == len(scenes) and 0.0 <= scores["colour_on_white"] <= 1.0
    assert set(self_consistency(pipe.model, scenes, images)) == {"colour", "shape", "size"}
    for mode in ("latents", "vlm", "both"):
        got = context_answers(pipe, scenes[:2], mode, guidance_scale=1.0, steps=2)
        assert all(0.0 <= v <= 1.0 for v in got.values())
    with pytest.raises(ValueError, match="image_context"):
        context_answers(pipe, scenes[:1], "pixels", guidance_scale=1.0, steps=2)
