"""Helpers for tests that run the CLI in a subprocess (imported by name: tests/training is on sys.path)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def cli_env() -> dict:
    """Environment for subprocess runs of the CLI: this checkout importable, one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def cli_args(config) -> list[str]:
    """The command-line flags that reproduce `config` exactly (every key, as YAML values)."""
    args = []
    for key, value in config.to_dict().items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list):
            args += [flag, *value]
        else:
            args += [flag, json.dumps(value) if not isinstance(value, str) else value]
    return args

