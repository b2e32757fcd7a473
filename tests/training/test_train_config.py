"""TrainConfig: presets, YAML, flags, validation."""

from __future__ import annotations

import pytest
import yaml

from lmfusion.cli import main
from lmfusion.training.config import PRESETS, TrainConfig, config_differences, load_config
from lmfusion.training.loop import lr_factor

from train_helpers import REPO


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 3.0e-4\nmax_steps: 7\ncodec: {name: pixel}\nmodel: {unet_channels: 64}\n")
    config = load_config(path=path, overrides={"max_steps": 9})
    assert config.lr == 3e-4 and config.max_steps == 9 and config.model == {"unet_channels": 64}
    layered = load_config("quickstart", path, {"batch_size": 2})
    assert layered.name == "quickstart" and layered.max_steps == 7 and layered.batch_size == 2


def test_model_fields_merge_over_the_preset_and_file(tmp_path):
    """--model sets the fields it names and keeps the preset's others (the paper preset's U-Net size)."""
    config = load_config("paper", overrides={"model": {"objective": "eps"}})
    assert config.model == {**PRESETS["paper"]["model"], "objective": "eps"}
    path = tmp_path / "run.yaml"
    path.write_text("model: {timestep_shift: 3.0}\n")
    layered = load_config("quickstart", path, {"model": {"unet_channels": 64}})
    assert layered.model == {**PRESETS["quickstart"]["model"], "timestep_shift": 3.0, "unet_channels": 64}


def test_unknown_and_bad_keys_are_clear_errors(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("lr_warmup: 10\n")
    with pytest.raises(ValueError, match="lr_warmup"):
        load_config(path=path)
    with pytest.raises(ValueError, match="bogus"):
        load_config(overrides={"bogus": 1})
    with pytest.raises(ValueError, match="unet_chanels"):
        load_config(overrides={"model": {"unet_chanels": 8}})
    with pytest.raises(ValueError, match="patch_size"):  # has its own top-level key
        load_config(overrides={"model": {"patch_size": 4}})
    with pytest.raises(ValueError, match="lr must be a float"):
        load_config(overrides={"lr": "fast"})
    with pytest.raises(ValueError, match="max_steps must be a int"):
        load_config(overrides={"max_steps": 1.5})
    with pytest.raises(ValueError, match="precision"):
        load_config(overrides={"precision": "fp16"})
    with pytest.raises(ValueError, match="chat_clean_stop_ratio must be in \\[0, 1\\]"):
        load_config(overrides={"chat_clean_stop_ratio": 1.5})
    with pytest.raises(ValueError, match="unknown preset"):
        load_config("nope")
    with pytest.raises(FileNotFoundError):
        load_config(path=tmp_path / "missing.yaml")


def test_cli_flags_parse_as_yaml(capsys):
    code = main(["train", "--preset", "quickstart", "--lr", "1e-3", "--codec", "{name: taef2, path: x}",
                 "--gradient-checkpointing", "--sample-prompts", "a red circle", "no", "--name", "no", "--print-config"])
    assert code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["lr"] == 1e-3 and printed["codec"] == {"name": "taef2", "path": "x"}
    assert printed["gradient_checkpointing"] is True and printed["name"] == "no"
    assert printed["sample_prompts"] == ["a red circle", "no"]


def test_the_old_sample_cfg_key_still_loads_as_sample_guidance_scale(tmp_path, capsys):
    old_run = tmp_path / "config.yaml"  # what runs saved before the rename
    saved = TrainConfig().to_dict()
    del saved["sample_guidance_scale"]
    old_run.write_text(yaml.safe_dump({**saved, "sample_cfg": 2.5}, sort_keys=False))
    assert load_config(path=old_run).sample_guidance_scale == 2.5
    assert TrainConfig.from_dict({"sample_cfg": 4}).sample_guidance_scale == 4.0
    with pytest.raises(ValueError, match="both 'sample_cfg' and its new name"):
        TrainConfig.from_dict({"sample_cfg": 4, "sample_guidance_scale": 2})
    assert main(["train", "--sample-cfg", "5", "--print-config"]) == 0  # the old flag, unlisted in --help
    assert yaml.safe_load(capsys.readouterr().out)["sample_guidance_scale"] == 5.0


def test_cli_unknown_key_in_file_is_one_line_error(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("batchsize: 4\n")
    assert main(["train", "--config", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert "batchsize" in err and len(err.splitlines()) == 1


def test_quickstart_yaml_is_the_preset():
    from_file = load_config(path=REPO / "configs" / "quickstart.yaml")
    assert from_file == load_config("quickstart")
    assert from_file.base_model == "smollm2-135m" and from_file.codec == {"name": "taef2"}  # shipped weights
    assert from_file.image_size == 64 and from_file.patch_size == 2


def test_quickstart_720_is_the_preset_in_twice_the_steps():
    """The overlay sees the preset's examples in 2x the optimizer steps and changes nothing else."""
    preset = load_config("quickstart")
    layered = load_config("quickstart", REPO / "configs" / "quickstart_720.yaml")
    assert layered.batch_size * layered.max_steps == preset.batch_size * preset.max_steps
    assert layered.max_steps == 2 * preset.max_steps
    assert layered.batch_size * layered.warmup_steps == preset.batch_size * preset.warmup_steps
    schedule = {"name", "batch_size", "max_steps", "warmup_steps", "log_every", "probe_every",
                "checkpoint_every", "sample_every"}
    differing = {key for key, value in vars(layered).items() if getattr(preset, key) != value}
    assert differing <= schedule and {"batch_size", "max_steps"} <= differing

def test_fresh_modules_get_their_own_learning_rate(tiny_base):
    """The U-Net blocks, timestep MLP and BOI/EOI rows train at lr x fresh_lr_scale."""
    from lmfusion.model.lmfusion import LMFusionModel
    from lmfusion.testing import tiny_lmfusion_config
    from lmfusion.training.loop import build_optimizer

    model = LMFusionModel.from_text_model(str(tiny_base), tiny_lmfusion_config(str(tiny_base)))
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4, min_lr=1e-5, fresh_lr_scale=10))
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        if param.requires_grad:
            want = 1e-3 if name.split(".")[0] in ("time_embed", "image_in", "image_out", "special_embed",
                                                  "special_head") else 1e-4
            assert lr_of[id(param)] == pytest.approx(want), name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(model.trainable_parameters())


def test_presets_are_valid_and_batches_split():
    for name in PRESETS:
        load_config(name)
    config = TrainConfig(batch_size=8)
    assert config.split_batch(1) == (8, 1) and config.split_batch(2) == (4, 1)
    assert TrainConfig(batch_size=8, micro_batch_size=2).split_batch(2) == (2, 2)
    with pytest.raises(ValueError, match="multiple"):
        TrainConfig(batch_size=6, micro_batch_size=4).split_batch(1)


def test_lr_schedule_warms_up_then_decays_to_floor():
    config = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_factor(0, config) == pytest.approx(0.1) and lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(60, config) == pytest.approx(0.55)
    assert lr_factor(110, config) == pytest.approx(0.1) and lr_factor(500, config) == pytest.approx(0.1)


def test_resume_differences_ignore_logging_knobs():
    a = TrainConfig()
    assert config_differences(a, a.replace(max_steps=5, log_every=1, sample_every=3)) == []
    assert config_differences(a, a.replace(lr=1.0, seed=3)) == ["lr", "seed"]


def test_train_help_gives_every_key_a_line_with_its_default(capsys):
    import dataclasses

    from lmfusion.cli import main
    from lmfusion.training.config_help import FIELD_HELP

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(FIELD_HELP) == sorted(names), "every TrainConfig field needs a line in config_help.FIELD_HELP"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    text = text.split("defaults before any preset:", 1)[1]  # the config keys' section, not the usage line
    for name in names:
        flag = "--" + name.replace("_", "-") + " "
        assert flag in text
        after = text.split(flag, 1)[1]
        assert FIELD_HELP[name].split()[0] in after and "(default:" in after.split("--", 1)[0], name
    assert "(default: 0.0001)" in text and '(default: "ddp")' in text


def test_the_configs_guidance_scale_is_saved_in_the_model_config(make_config):
    from lmfusion.config import TINY_UNET
    from lmfusion.training.loop import build_model

    assert build_model(make_config(guidance_scale=4.0))[0].config.default_guidance_scale == 4.0
    # `model: {guidance_scale: ..}` is the same setting spelled as a model key; it wins.
    assert build_model(make_config(guidance_scale=4.0, model={**TINY_UNET, "guidance_scale": 2.5}))[0].config.guidance_scale == 2.5
