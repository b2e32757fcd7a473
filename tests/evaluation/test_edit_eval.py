"""Editing evaluation: the oracle's edit scores on exact images, and `lmfusion eval --task edit` end to end."""

import json

import pytest
from PIL import Image

from lmfusion.cli import main
from lmfusion.data.images import pil_to_tensor
from lmfusion.data.shapes_edits import EDIT_TYPES, generate_shapes_edits
from lmfusion.evaluation.edit import LOST_REASONS, judge_edit, load_edit_test, score_edit, score_images


@pytest.fixture(scope="module")
def edits64(tmp_path_factory):
    return generate_shapes_edits(tmp_path_factory.mktemp("edits64") / "set", 60, size=64, seed=11,
                                 test_fraction=0.5, progress=False)


def test_true_targets_score_one_and_copying_the_source_scores_no_edit(edits64):
    sources, targets, _, rows = load_edit_test(edits64, 64, 30)
    assert {row["edit_type"] for row in rows} == set(EDIT_TYPES)
    for source, target, row in zip(sources, targets, rows):
        assert score_edit(target, row) == {"success": 1.0, "preservation": 1.0, "joint": 1.0}, row["instruction"]
        copied = score_edit(source, row)
        assert copied["success"] == 0.0 and copied["joint"] == 0.0, row["instruction"]
        # Copying keeps every object as it was: preserved, unless the edit changes the count.
        assert copied["preservation"] == float(row["edit_type"] not in ("add", "remove")), row["instruction"]
    summary = score_images(targets, targets, rows)
    assert summary["overall"]["joint"] == 1.0 and summary["overall"]["l1"] == 0.0 and summary["overall"]["n"] == 30
    assert summary["overall"]["lost"] == {reason: 0.0 for reason in LOST_REASONS}
    copies = score_images(sources, targets, rows)  # copying loses only the count, and only where it changes
    assert copies["add"]["lost"]["count"] == copies["remove"]["lost"]["count"] == 1.0
    assert copies["recolour"]["lost"] == {reason: 0.0 for reason in LOST_REASONS}
    assert all(summary[kind]["n"] == 5 for kind in EDIT_TYPES)


def test_an_edit_of_the_wrong_attribute_fails_success_and_preservation(edits64):
    _, _, _, rows = load_edit_test(edits64, 64, 30)
    from lmfusion.data.shapes import render_scene

    row = next(r for r in rows if r["edit_type"] == "recolour")
    wrong = [dict(o) for o in row["target_objects"]]
    wrong[row["edited"]]["shape"] = next(s for s in ("circle", "square", "triangle") if s != wrong[row["edited"]]["shape"])
    score = score_edit(pil_to_tensor(render_scene(wrong, 64)), row)
    assert score["success"] == 1.0 and score["preservation"] == 0.0 and score["joint"] == 0.0
    assert judge_edit(pil_to_tensor(render_scene(wrong, 64)), row) == (True, ("shape",))


def test_eval_task_edit_writes_a_report_with_both_baselines(tiny_checkpoint, tmp_path, capsys):
    data = generate_shapes_edits(tmp_path / "edits16", 24, size=16, seed=3, test_fraction=0.25, progress=False)
    out = tmp_path / "eval"
    code = main(["eval", "--task", "edit", "--checkpoint", str(tiny_checkpoint), "--data", str(data), "--out", str(out),
                 "--n", "6", "--steps", "1", "--batch-size", "4", "--image-guidance-scale", "1", "1.5"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["methods"]) == ["model (image guidance 1)", "model (image guidance 1.5)", "copy the source",
                                       "target caption alone"]
    for scores in report["methods"].values():
        assert scores["overall"]["n"] == 6 and set(scores["overall"]) == {"success", "preservation", "joint", "l1", "n", "lost"}
        assert {kind for kind in EDIT_TYPES} <= set(scores)
    sources, targets, _, _ = load_edit_test(data, 16, 6)
    want = float((sources - targets).abs().mean())
    assert report["methods"]["copy the source"]["overall"]["l1"] == pytest.approx(want, abs=1e-6)
    assert report["settings"]["image_guidance_scales"] == [1.0, 1.5] and report["settings"]["guidance_scale"] == 3.0
    page = (out / "report.md").read_text()
    assert "## joint" in page and "copy the source" in page and "## what preservation lost" in page
    assert Image.open(out / "edits.png").size[0] > 0
    assert "report.json" in capsys.readouterr().out
    assert main(["eval", "--task", "edit", "--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path)]) == 2
    assert "no edits.jsonl" in capsys.readouterr().err


def test_noise_scores_nothing_even_where_some_blob_has_the_asked_colour(edits64):
    import torch

    _, _, _, rows = load_edit_test(edits64, 64, 30)
    noise = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    for row in rows:
        assert score_edit(noise, row) == {"success": 0.0, "preservation": 0.0, "joint": 0.0}
        assert judge_edit(noise, row) == (False, ("background",))
