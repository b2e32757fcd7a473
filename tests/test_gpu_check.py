"""benchmarks/gpu_check.py: a clear exit without a GPU, and its checks run (on the CPU, tiny model)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _run(*args, timeout=300):
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so():
    result = _run()
    assert result.returncode == 2
    assert "no CUDA GPU is visible" in result.stderr and "Traceback" not in result.stderr


def test_its_checks_pass_on_the_cpu_with_a_tiny_model(tiny_base):
    # fp32: bf16 autocast on a CPU without AVX-512-BF16 made this run take over 5 minutes (AMD EPYC, AVX2)
    result = _run("--device", "cpu", "--base", str(tiny_base), "--train-steps", "1", "--batch", "2", "--sample-steps", "2",
                  "--precision", "fp32")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "| one prompt | True | 0 |" in result.stdout and "All checks passed." in result.stdout
