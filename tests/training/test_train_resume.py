"""Exact resume: a run SIGKILLed mid-training and resumed ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import torch
from safetensors.torch import load_file

from lmfusion.training import train
from lmfusion.training.checkpoint import latest_checkpoint
from train_helpers import PYTHON, REPO, cli_args, cli_env

STEPS = 24


def _final_state(run_dir) -> tuple[dict, dict]:
    final = run_dir / "checkpoints" / f"step_{STEPS:06d}"
    return load_file(str(final / "model" / "lmfusion_weights.safetensors")), load_file(str(final / "optimizer.safetensors"))


def test_sigkill_then_resume_is_bit_identical(make_config, tmp_path):
    common = dict(max_steps=STEPS, checkpoint_every=3, keep_checkpoints=2, batch_size=4, micro_batch_size=2)
    killed = make_config(runs_dir=str(tmp_path / "killed"), **common)
    train(killed.replace(max_steps=1, runs_dir=str(tmp_path / "warm")))  # fill the latent cache first

    process = subprocess.Popen([PYTHON, "-m", "lmfusion.cli", "train", *cli_args(killed)], cwd=REPO, env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while latest_checkpoint(killed.run_dir) is None:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    stopped_at = int(latest_checkpoint(killed.run_dir).name.split("_")[1])
    assert stopped_at < STEPS, "the run finished before it could be killed"

    resumed = train(killed, resume=True)
    assert resumed["first_step"] == stopped_at and resumed["steps"] == STEPS
    reference = make_config(runs_dir=str(tmp_path / "reference"), **common)
    train(reference)

    weights, opt = _final_state(killed.run_dir)
    ref_weights, ref_opt = _final_state(reference.run_dir)
    assert weights.keys() == ref_weights.keys() and opt.keys() == ref_opt.keys()
    for name in weights:
        assert torch.equal(weights[name], ref_weights[name]), name
    for name in opt:
        assert torch.equal(opt[name], ref_opt[name]), name
