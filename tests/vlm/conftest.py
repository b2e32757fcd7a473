"""A tiny VLM (tiny random Llama + a one-layer SigLIP tower at 16 px), built and saved once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlm_helpers import tiny_recipe

from lmfusion.vlm.train import build_tiny_llava


@pytest.fixture(scope="session")
def tiny_vlm(tiny_base, tmp_path_factory) -> tuple[Path, dict]:
    """(folder, record) of a tiny VLM trained for a few steps."""
    folder = tmp_path_factory.mktemp("vlm") / "tiny_llava"
    return folder, build_tiny_llava(folder, tiny_recipe(tiny_base), progress=False)


@pytest.fixture(scope="session")
def peaky_base(tmp_path_factory) -> Path:
    """A tiny LM whose outputs depend on its inputs (default-init tiny LMs are near uniform)."""
    from lmfusion.testing import save_peaky_base

    return save_peaky_base(tmp_path_factory.mktemp("peaky"))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread avoids oversubscribing a shared CPU (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
