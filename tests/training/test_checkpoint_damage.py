"""Damaged or foreign checkpoint files end in one line naming the file, or in a loud fallback."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmfusion.cli import main
from lmfusion.integrity import MANIFEST, CheckpointError
from lmfusion.model.lmfusion import CONFIG_FILE, WEIGHTS_FILE, LMFusionModel
from lmfusion.testing import tiny_lmfusion_config
from lmfusion.training import train
from lmfusion.training.checkpoint import latest_checkpoint


def _truncate(path, keep=100):
    path.write_bytes(path.read_bytes()[:keep])


def _one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lmfusion")]  # not the loaders' progress bars
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_resume_falls_back_to_the_newest_intact_checkpoint(make_config, capsys):
    config = make_config(max_steps=4, checkpoint_every=2, keep_checkpoints=3, batch_size=4)
    first = train(config)
    step4 = latest_checkpoint(config.run_dir)
    assert step4.name == "step_000004" and (step4 / MANIFEST).is_file()
    _truncate(step4 / "optimizer.safetensors")

    resumed = train(config, resume=True)
    log = (config.run_dir / "train.log").read_text()
    assert "WARNING: checkpoint step_000004 is damaged" in log and "optimizer.safetensors" in log
    assert "falling back to step_000002" in log and resumed["first_step"] == 2
    # Steps 3-4 were retrained from step 2: the rewritten step 4 equals the original one.
    assert resumed["final"]["loss"] == pytest.approx(first["final"]["loss"], abs=1e-6)

    # Every checkpoint damaged: one line, no traceback, naming each damaged file.
    for checkpoint in (config.run_dir / "checkpoints").iterdir():
        _truncate(checkpoint / "model" / WEIGHTS_FILE)
    config_yaml = config.run_dir / "config.yaml"
    err = _one_error_line(capsys, ["train", "--config", str(config_yaml), "--resume"])
    assert "no intact checkpoint" in err and WEIGHTS_FILE in err and "step_000002" in err


@pytest.fixture
def saved(tiny_base, tmp_path):
    model = LMFusionModel.from_text_model(str(tiny_base), tiny_lmfusion_config(str(tiny_base)))
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_model_folder_damage_is_one_line_naming_the_file(saved, tmp_path, capsys):
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (16, 16)).save(image)
    argv = ["caption", "--checkpoint", str(saved), "--image", str(image), "--device", "cpu"]

    _truncate(saved / WEIGHTS_FILE)
    err = _one_error_line(capsys, argv)
    assert f"{saved / WEIGHTS_FILE}: damaged" in err

    (saved / MANIFEST).unlink()  # a folder from before manifests: the reader still names the file
    err = _one_error_line(capsys, argv)
    assert f"{saved / WEIGHTS_FILE}: not a readable safetensors file" in err


def test_malformed_or_foreign_config_names_the_file(saved):
    text = (saved / CONFIG_FILE).read_text()
    (saved / CONFIG_FILE).write_text(text.replace(",", "", 1))
    with pytest.raises(CheckpointError, match=rf"{CONFIG_FILE}: not valid JSON \(Expecting ',' delimiter"):
        LMFusionModel.from_pretrained(saved)
    (saved / CONFIG_FILE).write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(CheckpointError, match=rf"{CONFIG_FILE}: not a valid LMFusion config"):
        LMFusionModel.from_pretrained(saved)


def test_foreign_weights_and_old_folders(saved, tiny_base, tmp_path):
    (saved / MANIFEST).unlink()
    LMFusionModel.from_pretrained(saved)  # no manifest (older checkpoints): still loads
    other = LMFusionModel.from_text_model(str(tiny_base), tiny_lmfusion_config(str(tiny_base), unet_channels=16,
                                                                              unet_norm_groups=4))
    other.save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / WEIGHTS_FILE, saved / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE}: weights have other shapes"):
        LMFusionModel.from_pretrained(saved)
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(2)}, str(saved / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE}: weights do not match this model: missing"):
        LMFusionModel.from_pretrained(saved)
