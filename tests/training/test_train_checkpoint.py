"""Checkpoints: atomic saves, keep-last-K, the `latest` pointer, resolve_checkpoint, state round trips."""

from __future__ import annotations

import pytest
import torch

from lmfusion.training import checkpoint as ckpt
from lmfusion.training.loop import build_model, build_optimizer, build_scheduler


@pytest.fixture
def parts(make_config):
    config = make_config(keep_checkpoints=2)
    model, _ = build_model(config)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    for p in model.parameters():  # one real step, so the optimizer has moments to save
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    optimizer.step()
    scheduler.step()
    return config, model, optimizer, scheduler


def test_keep_last_k_and_latest_pointer(parts, tmp_path):
    config, model, optimizer, scheduler = parts
    run = tmp_path / "run"
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(run, step, model, optimizer, scheduler, {"note": step}, keep=2)
    names = [p.name for p in ckpt.list_checkpoints(run)]
    assert names == ["step_000003", "step_000004"]
    assert (run / "latest").read_text().strip() == "step_000004"
    assert ckpt.resolve_checkpoint(run) == run / "checkpoints" / "step_000004" / "model"
    assert ckpt.resolve_checkpoint(run / "checkpoints" / "step_000003") == run / "checkpoints" / "step_000003" / "model"
    model_dir = run / "checkpoints" / "step_000003" / "model"
    assert ckpt.resolve_checkpoint(model_dir) == model_dir
    with pytest.raises(FileNotFoundError):
        ckpt.resolve_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "empty_run")


def test_failed_save_leaves_previous_checkpoint_untouched(parts, tmp_path, monkeypatch):
    config, model, optimizer, scheduler = parts
    run = tmp_path / "run"
    ckpt.save_checkpoint(run, 1, model, optimizer, scheduler, {}, keep=3)
    real_save = ckpt.save_file
    calls = []

    def crash_on_second(tensors, path, *args, **kwargs):  # the optimizer file is written, then "power cut"
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", crash_on_second)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(run, 2, model, optimizer, scheduler, {}, keep=3)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_000001"]
    assert (run / "latest").read_text().strip() == "step_000001"
    assert not list((run / "checkpoints").glob(".*"))  # no temporary folder left behind


def test_killed_save_is_ignored_and_cleaned(parts, tmp_path):
    config, model, optimizer, scheduler = parts
    run = tmp_path / "run"
    ckpt.save_checkpoint(run, 1, model, optimizer, scheduler, {}, keep=3)
    stale = run / "checkpoints" / ".step_000002.tmp-abc"  # what SIGKILL mid-save leaves
    (stale / "model").mkdir(parents=True)
    half = run / "checkpoints" / "step_000003"  # a folder without trainer_state.json is not trusted
    half.mkdir()
    (run / "latest").write_text("step_000003\n")
    assert ckpt.latest_checkpoint(run).name == "step_000001"
    assert ckpt.remove_partial(run) == 1 and not stale.exists()


def test_resave_killed_between_renames_keeps_the_step(parts, tmp_path):
    """Re-saving a step moves the old copy aside first; a crash right then must not lose it."""
    config, model, optimizer, scheduler = parts
    run = tmp_path / "run"
    saved = ckpt.save_checkpoint(run, 1, model, optimizer, scheduler, {}, keep=3)
    aside = run / "checkpoints" / ".step_000001.old-12345"  # where publish_directory parks it
    saved.rename(aside)
    assert ckpt.latest_checkpoint(run) is None
    assert ckpt.remove_partial(run) == 1
    assert ckpt.latest_checkpoint(run) == saved and not aside.exists()


def test_checkpoint_files_are_not_private(parts, tmp_path):
    """Temporary folders are created 0700/0600; the published checkpoint follows the umask."""
    config, model, optimizer, scheduler = parts
    run = tmp_path / "run"
    saved = ckpt.save_checkpoint(run, 1, model, optimizer, scheduler, {}, keep=3)
    for path in [saved, *saved.rglob("*"), run / "latest"]:
        mode = path.stat().st_mode
        assert mode & 0o044 == 0o044, f"{path} is not readable by group/others: {oct(mode)}"


def test_state_round_trips_exactly(parts, tmp_path, make_config):
    config, model, optimizer, scheduler = parts
    torch.manual_seed(123)
    path = ckpt.save_checkpoint(tmp_path / "run", 7, model, optimizer, scheduler, {"samples_seen": 56}, keep=1)
    expected_rng = torch.rand(3)

    other, _ = build_model(make_config(seed=99))
    other_opt = build_optimizer(other, config)
    other_sched = build_scheduler(other_opt, config)
    state = ckpt.load_checkpoint(path, other, other_opt, other_sched)
    assert state["step"] == 7 and state["samples_seen"] == 56
    assert torch.equal(torch.rand(3), expected_rng)  # RNG restored
    for (name, a), b in zip(model.adapter_state_dict().items(), other.adapter_state_dict().values()):
        assert torch.equal(a, b), name
    mine, theirs = optimizer.state_dict(), other_opt.state_dict()
    assert mine["param_groups"] == theirs["param_groups"]
    for index, values in mine["state"].items():
        for key, value in values.items():
            assert torch.equal(value, theirs["state"][index][key]), (index, key)
    assert other_sched.state_dict() == scheduler.state_dict()
