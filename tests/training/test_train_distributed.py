"""torchrun on CPU (gloo): 2 processes follow the same loss curve as 1 process with the same global batch."""

from __future__ import annotations

import json
import subprocess

import pytest

from lmfusion.training import train
from train_helpers import PYTHON, REPO, cli_args, cli_env


def test_two_processes_match_one(make_config, tmp_path):
    config = make_config(max_steps=4, batch_size=4, micro_batch_size=2, checkpoint_every=2, log_every=1)
    single = train(config.replace(runs_dir=str(tmp_path / "one")))  # 1 process x 2 micro-batches of 2

    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "lmfusion.cli", "train", *cli_args(config.replace(runs_dir=str(tmp_path / "two")))]
    result = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "two" / config.name
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "2 process(es) x 1 micro-batch(es) of 2" in (run / "train.log").read_text()
    assert len(lines) == 4
    for one, two in zip(single["history"], lines):
        for key in ("loss", "text_loss", "image_loss", "grad_norm"):
            assert two[key] == pytest.approx(one[key], abs=1e-5), (one["step"], key)
        assert one["text_tokens"] == two["text_tokens"] and one["images"] == two["images"]
    assert (run / "latest").read_text().strip() == "step_000004"  # rank 0 wrote the checkpoints
