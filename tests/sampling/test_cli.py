"""`lmfusion generate | caption | chat` through the real dispatcher: outputs and one-line errors."""

import io
import json

import pytest
from PIL import Image

from lmfusion.cli import main

FAST = ["--steps", "2", "--device", "cpu"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, command, fragment):
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("lmfusion")]
    assert len(lines) == 1 and lines[0].startswith(f"lmfusion {command}: error:"), err
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "shape.png"
    Image.new("RGB", (24, 20), (200, 30, 30)).save(path)
    return path


# ---------------------------------------------------------------------- working paths
def test_generate_one_image(checkpoint, tmp_path, capsys):
    out = tmp_path / "out.png"
    code, stdout, _ = _run(capsys, "generate", "--checkpoint", checkpoint, "--prompt", "a red circle", "--out", out, *FAST)
    assert code == 0 and stdout.strip() == str(out)
    assert Image.open(out).size == (16, 16)


def test_generate_n_writes_a_grid_or_numbered_files(checkpoint, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    args = ["generate", "--checkpoint", checkpoint, "--prompt", "a red circle", "--n", "4", *FAST]
    assert _run(capsys, *args, "--out", grid)[0] == 0
    assert Image.open(grid).size == (2 + 2 * 18, 2 + 2 * 18)  # 2 x 2 tiles of 16 px, 2 px padding
    code, stdout, _ = _run(capsys, *args, "--out", tmp_path / "s.png", "--separate")
    assert code == 0 and stdout.split() == [str(tmp_path / f"s_{k}.png") for k in range(1, 5)]


def test_generate_same_seed_same_file(checkpoint, tmp_path, capsys):
    for name in ("a.png", "b.png"):
        _run(capsys, "generate", "--checkpoint", checkpoint, "--prompt", "a red circle", "--out", tmp_path / name,
             "--seed", "3", *FAST)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_caption(checkpoint, image_file, capsys):
    code, stdout, _ = _run(capsys, "caption", "--checkpoint", checkpoint, "--image", image_file, "--max-new-tokens", "6")
    assert code == 0 and stdout.strip()
    code, stdout, _ = _run(capsys, "caption", "--checkpoint", checkpoint, "--image", image_file, image_file,
                           "--max-new-tokens", "6")
    assert code == 0 and [line.split("\t")[0] for line in stdout.splitlines()] == [str(image_file)] * 2


def test_chat_with_prompt_and_interactive(checkpoint, tmp_path, capsys, monkeypatch):
    args = ["chat", "--checkpoint", checkpoint, "--max-new-tokens", "4", *FAST]
    code, stdout, _ = _run(capsys, *args, "--prompt", "a red circle", "--out", tmp_path / "one")
    assert code == 0 and "**User:** a red circle" in (tmp_path / "one" / "chat.md").read_text()
    monkeypatch.setattr("sys.stdin", io.StringIO("a red circle\n\nand a square\n"))
    code, stdout, _ = _run(capsys, *args, "--out", tmp_path / "two")
    transcript = (tmp_path / "two" / "chat.md").read_text()
    assert code == 0 and transcript.count("**User:**") == 2 and len(stdout.splitlines()) == 2


# ---------------------------------------------------------------------- user errors
def test_missing_checkpoint(tmp_path, capsys):
    code, _, err = _run(capsys, "generate", "--checkpoint", tmp_path / "nope", "--prompt", "a", "--out", tmp_path / "o.png")
    _assert_one_line_error(code, err, "generate", "not found")


def test_not_an_lmfusion_checkpoint(peaky_base, tmp_path, capsys):
    code, _, err = _run(capsys, "caption", "--checkpoint", peaky_base, "--image", tmp_path / "x.png")
    _assert_one_line_error(code, err, "caption", "missing_file")  # the image is checked first
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    code, _, err = _run(capsys, "caption", "--checkpoint", peaky_base, "--image", tmp_path / "x.png")
    _assert_one_line_error(code, err, "caption", "neither an LMFusion model folder")


def test_checkpoint_on_the_wrong_base_model(checkpoint, make_base, tmp_path, capsys):
    import shutil

    other = make_base(tmp_path / "other_base", seed=5)
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)
    config = json.loads((copy / "lmfusion_config.json").read_text())
    config["base_model"] = str(other)
    (copy / "lmfusion_config.json").write_text(json.dumps(config))
    code, _, err = _run(capsys, "generate", "--checkpoint", copy, "--prompt", "a", "--out", tmp_path / "o.png", *FAST)
    _assert_one_line_error(code, err, "generate", "wrong base model")


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--prompt", ""], "prompt is empty"),
        (["--prompt", "   "], "prompt is empty"),
        (["--prompt", "red " * 600], "at most 506 fit"),
        (["--prompt", "a", "--guidance-scale", "-1"], "guidance_scale must be >= 0"),
        (["--prompt", "a", "--guidance", "-1"], "guidance_scale must be >= 0"),  # the old, hidden spelling
        (["--prompt", "a", "--steps", "0"], "steps must be >= 1"),
        (["--prompt", "a", "--n", "0"], "n must be >= 1"),
        (["--prompt", "a", "--device", "warp-drive"], "unknown device"),
    ],
)
def test_generate_bad_input(checkpoint, tmp_path, capsys, extra, fragment):
    code, _, err = _run(capsys, "generate", "--checkpoint", checkpoint, "--out", tmp_path / "o.png", *extra)
    _assert_one_line_error(code, err, "generate", fragment)
    assert not (tmp_path / "o.png").exists()


def test_guidance_scale_flag_defaults_to_the_model_and_keeps_a_hidden_old_spelling(capsys):
    import argparse

    from lmfusion.diffusion import DEFAULT_GUIDANCE_SCALE
    from lmfusion.sampling.cli import add_guidance_scale_argument

    parser = argparse.ArgumentParser()
    add_guidance_scale_argument(parser)
    assert parser.parse_args([]).guidance_scale is None  # the model's own (tests/sampling/test_default_guidance.py)
    assert parser.parse_args(["--guidance-scale", "3"]).guidance_scale == 3.0
    assert parser.parse_args(["--guidance", "2.5"]).guidance_scale == 2.5
    help_text = " ".join(parser.format_help().split())
    assert "--guidance-scale" in help_text and "the model's own" in help_text and str(DEFAULT_GUIDANCE_SCALE) in help_text
    assert "--guidance " not in help_text and "--guidance\n" not in help_text


def test_generate_bad_out_extension(checkpoint, tmp_path, capsys):
    code, _, err = _run(capsys, "generate", "--checkpoint", checkpoint, "--prompt", "a", "--out", tmp_path / "o.txt")
    _assert_one_line_error(code, err, "generate", "unknown image extension")


def test_generate_unconditional_allows_empty_prompt(checkpoint, tmp_path, capsys):
    out = tmp_path / "u.png"
    code, _, _ = _run(capsys, "generate", "--checkpoint", checkpoint, "--prompt", "", "--unconditional", "--out", out, *FAST)
    assert code == 0 and out.exists()


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n garbage", b"hello"])
def test_caption_unreadable_image(checkpoint, tmp_path, capsys, content):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    code, _, err = _run(capsys, "caption", "--checkpoint", checkpoint, "--image", bad)
    _assert_one_line_error(code, err, "caption", "bad image")


def test_caption_bad_temperature(checkpoint, image_file, capsys):
    code, _, err = _run(capsys, "caption", "--checkpoint", checkpoint, "--image", image_file, "--temperature", "-1")
    _assert_one_line_error(code, err, "caption", "temperature")


@pytest.mark.parametrize(
    "extra, fragment",
    [(["--prompt", " "], "prompt is empty"), (["--prompt", "a", "--guidance-scale", "-2"], "guidance_scale"),
     (["--prompt", "red " * 600], "tokens")],
)
def test_chat_bad_input(checkpoint, tmp_path, capsys, extra, fragment):
    code, _, err = _run(capsys, "chat", "--checkpoint", checkpoint, "--out", tmp_path / "c", *extra)
    _assert_one_line_error(code, err, "chat", fragment)
