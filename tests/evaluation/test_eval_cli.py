"""`lmfusion eval` end to end on a tiny checkpoint: report.json, report.md and grids, reused feature net."""

import json

from lmfusion.cli import main


def test_eval_writes_a_complete_report(tiny_checkpoint, shapes_data, feature_cache, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(shapes_data), "--out", str(out),
                 "--n", "6", "--steps", "2", "--batch-size", "4", "--guidance-scale", "2",
                 "--feature-cache", str(feature_cache)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "lmfusion"
    assert report["text"]["max_abs_logit_diff"] == 0.0 and report["text"]["base_ppl"] == report["text"]["model_ppl"]
    understanding, generation = report["understanding"], report["generation"]
    assert understanding["n"] == 6 and len(understanding["samples"]) == 6
    assert {"cider", "exact_match", "scene"} <= understanding.keys()
    assert generation["n"] == 6 and generation["fid"] >= 0 and generation["fid_real_vs_real"] >= 0
    assert set(generation["oracle"]) == {"shape", "colour", "size", "position", "count", "all_correct",
                                         "white_background", "colour_on_white"}
    assert generation["feature_net"]["kind"] == "shapes"
    assert report["settings"]["n"] == 6 and report["machine"]["device"] == "cpu"
    assert report["settings"]["guidance_scale"] == 2.0 and "guidance" not in report["settings"]
    page = (out / "report.md").read_text()
    assert "guidance scale 2.0" in page
    for needle in ("Text preservation", "CIDEr", "FID", "Oracle", "![generated](generated.png)"):
        assert needle in page
    assert (out / "generated.png").stat().st_size > 0 and (out / "real.png").stat().st_size > 0
    assert "report.json" in capsys.readouterr().out


def test_reports_written_before_the_rename_load_with_guidance_scale(tmp_path):
    from lmfusion.evaluation.evaluate import EvalSettings, load_report

    old = EvalSettings(guidance_scale=3.0).to_dict()
    old["guidance"] = old.pop("guidance_scale")
    (tmp_path / "report.json").write_text(json.dumps({"settings": old}))
    assert load_report(tmp_path)["settings"] == EvalSettings(guidance_scale=3.0).to_dict()
    assert load_report(tmp_path / "missing") is None


def test_user_errors_are_one_line(tiny_checkpoint, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "nothing"), "--data", str(tmp_path)]) == 2
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path), "--n", "1"]) == 2
    assert "n must be at least 2" in capsys.readouterr().err
