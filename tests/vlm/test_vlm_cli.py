"""`lmfusion vlm build | eval`: a tiny build and evaluation end to end, and one-line errors."""

from __future__ import annotations

import json

from lmfusion import cli

TINY_BUILD = ["--steps", "2", "--batch-size", "2", "--pretrain-steps", "1", "--train-scenes", "8",
              "--patch-size", "8", "--tower-hidden", "32", "--tower-layers", "1", "--no-progress"]


def _error(capsys, argv):
    assert cli.main(argv) == 2
    return capsys.readouterr().err.strip()


def test_eval_reports_accuracy_and_baselines(tiny_vlm, tmp_path, capsys):
    folder, _ = tiny_vlm
    report_file = tmp_path / "report.json"
    assert cli.main(["vlm", "eval", "--vlm", str(folder), "--seed", "7", "--count", "3", "--max-new-tokens", "2", "--no-progress",
                     "--out", str(report_file)]) == 0
    printed = capsys.readouterr().out
    assert "What colour is the shape?" in printed and "blank image" in printed
    report = json.loads(report_file.read_text())
    assert report["n"] == 3 and set(report["vlm"]["accuracy"]) == {"caption", "colour", "shape", "size", "position"}
    assert set(report["blank_image_answers"]) == set(report["majority_answers"])
    assert report["text_logits_max_abs_difference"] == 0.0  # the VLM's text side is its base LM


def test_build_writes_a_folder_and_refuses_to_overwrite(peaky_base, tmp_path, capsys):
    out = tmp_path / "vlm"
    argv = ["vlm", "build", "--out", str(out), "--base-model", str(peaky_base), *TINY_BUILD]
    # The CLI's image size is the recipe's 64 px; 8 px patches make 64 image tokens.
    assert cli.main(argv) == 0
    assert "answer loss" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["image_seq_length"] == 64
    assert "pass --overwrite" in _error(capsys, argv)


def test_bad_input_is_one_line(tiny_vlm, tmp_path, capsys):
    folder, _ = tiny_vlm
    assert "no VLM folder" in _error(capsys, ["vlm", "eval", "--vlm", str(tmp_path / "missing"), "--no-progress"])
    assert "is the seed" in _error(capsys, ["vlm", "eval", "--vlm", str(folder), "--seed", "0", "--no-progress"])
    assert "--count" in _error(capsys, ["vlm", "eval", "--vlm", str(folder), "--count", "0"])
    assert "not found" in _error(capsys, ["vlm", "build", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "none"),
                                          "--base-model", str(tmp_path)])


def test_build_trains_on_a_shapes_folder_with_two_object_scenes(peaky_base, tmp_path, capsys):
    from lmfusion.data.shapes import generate_shapes_dataset

    data = generate_shapes_dataset(tmp_path / "shapes", 8, seed=4, progress=False, two_object_prob=0.5)
    out = tmp_path / "vlm"
    assert cli.main(["vlm", "build", "--out", str(out), "--data", str(data), "--base-model", str(peaky_base),
                     *TINY_BUILD]) == 0
    assert json.loads((out / "tiny_llava.json").read_text())["data"] == str(data)
