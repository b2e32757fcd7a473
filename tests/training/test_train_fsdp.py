"""FSDP2 under torchrun on CPU (gloo): same result as one process, sharded state, exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmfusion.training import load_config, train
from lmfusion.training.checkpoint import latest_checkpoint
from train_helpers import PYTHON, REPO, cli_args, cli_env

STEPS = 12


def _torchrun(config, *extra) -> list[str]:
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "lmfusion.cli", "train", *cli_args(config), *extra]


def _run(command) -> None:
    result = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _weights(run_dir, step=STEPS) -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "model" / "lmfusion_weights.safetensors"))


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants (torchrun starts its workers in their own sessions)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in (children.read_text().split() if children.exists() else []):
        _kill_tree(int(child))
    os.kill(pid, signal.SIGKILL)


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fsdp_config(tiny_base, shapes, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")

    def make(name):
        return load_config("tiny", overrides=dict(
            base_model=str(tiny_base), data=str(shapes), runs_dir=str(root / name), latent_cache=str(root / "latents"),
            progress=False, threads=1, log_every=1, max_steps=STEPS, batch_size=4, micro_batch_size=2,
            checkpoint_every=3, keep_checkpoints=2, parallel="fsdp"))

    return make


@pytest.fixture(scope="module")
def reference(fsdp_config):
    """An uninterrupted 2-process FSDP run."""
    config = fsdp_config("two")
    train(config.replace(max_steps=1, runs_dir=config.runs_dir + "_warm"))  # fill the latent cache first
    _run(_torchrun(config))
    return config.run_dir


def test_two_fsdp_processes_match_one_process(fsdp_config, reference):
    single = train(fsdp_config("one"))  # one process x 2 micro-batches: no sharding
    two = _metrics(reference)
    assert len(two) == STEPS
    for one, other in zip(single["history"], two):
        for key in ("loss", "text_loss", "image_loss", "grad_norm"):
            assert other[key] == pytest.approx(one[key], abs=1e-5), (one["step"], key)
    ours, theirs = _weights(reference), _weights(fsdp_config("one").run_dir)
    assert ours.keys() == theirs.keys()
    # Weights, not running statistics: those follow the micro-batches each process saw (one
    # process updates them twice per step, two processes once each, rank 0's being kept).
    weights = [name for name in ours if "running_" not in name and "num_batches" not in name]
    for name in weights:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=0, msg=name)


def test_each_rank_holds_half_of_the_trainable_state(reference):
    log = (reference / "train.log").read_text()
    assert "FSDP2 sharded" in log
    shards = json.loads(log.split("per-rank shards: ", 1)[1].splitlines()[0])
    total, frozen_total = shards["trainable_total"], shards["frozen_total"]
    assert sum(shards["trainable"]) == total and sum(shards["frozen"]) == frozen_total > 0
    for trainable, moments, frozen in zip(shards["trainable"], shards["optimizer"], shards["frozen"]):
        assert abs(trainable - total / 2) < 0.02 * total  # each rank stores about half ...
        assert moments == 2 * trainable  # ... and AdamW moments only for its own shard
        assert abs(frozen - frozen_total / 2) < 0.02 * frozen_total  # frozen text weights sharded too
    checkpoint = latest_checkpoint(reference)
    assert sorted(p.name for p in (checkpoint / "shards").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_sigkilled_fsdp_run_resumes_exactly(fsdp_config, reference):
    config = fsdp_config("killed")
    process = subprocess.Popen(_torchrun(config), cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.time() + 300  # torchrun starts slowly on a loaded machine
    while latest_checkpoint(config.run_dir) is None:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    _kill_tree(process.pid)  # the launcher and both workers, as when a machine dies
    process.wait()
    stopped_at = int(latest_checkpoint(config.run_dir).name.split("_")[1])
    assert stopped_at < STEPS, "the run finished before it could be killed"

    _run(_torchrun(config, "--resume"))
    assert f"resumed from {latest_checkpoint(config.run_dir).parent / f'step_{stopped_at:06d}'}" in \
        (config.run_dir / "train.log").read_text()
    ours, theirs = _weights(config.run_dir), _weights(reference)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    resumed = {m["step"]: m["loss"] for m in _metrics(config.run_dir)}
    assert all(resumed[m["step"]] == m["loss"] for m in _metrics(reference))


def test_fsdp_refuses_text_only_examples_up_front(fsdp_config):
    from lmfusion.training.distributed import DistInfo
    from lmfusion.training.loop import check_parallel

    config = fsdp_config("text").replace(text_only_ratio=0.5)
    with pytest.raises(ValueError, match="text_only_ratio"):
        check_parallel(config, DistInfo(rank=0, world_size=2))
    check_parallel(config, DistInfo())  # one process: nothing is sharded
    check_parallel(config.replace(parallel="ddp"), DistInfo(rank=0, world_size=2))
