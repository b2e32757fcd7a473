"""Shared, session-scoped fixtures: one small shapes dataset, one tiny checkpoint, one feature-net cache."""

from pathlib import Path

import pytest
import torch

from lmfusion.data import generate_shapes_dataset
from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.testing import tiny_lmfusion_config


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    """400 shapes images at 32 px: 360 train, 40 test."""
    path = tmp_path_factory.mktemp("eval_data") / "shapes"
    return generate_shapes_dataset(path, 400, size=32, seed=0, progress=False, split=True, test_fraction=0.1)


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature_nets")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_base, tmp_path_factory) -> Path:
    """An untrained tiny LMFusion model saved like a training checkpoint's model folder."""
    path = tmp_path_factory.mktemp("ckpt") / "model"
    config = tiny_lmfusion_config(base_model=str(tiny_base))
    LMFusionModel.from_text_model(str(tiny_base), config).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run tiny models: one thread avoids oversubscribing a shared CPU (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
