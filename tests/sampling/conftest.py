"""Shared fixtures: a tiny base LM whose greedy output varies, wrapped as an LMFusion model.

The tiny base is initialised with a larger std than usual so its logits are peaked: with the
default init every greedy step picks the same token and "equals the base model" tests are weak.
The up block's output conv is zero at init (it predicts zero noise); it is re-drawn here so that
noise predictions, and thus every sampler comparison, actually depend on the model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.testing import save_peaky_base, tiny_sampling_model

@pytest.fixture(scope="session")
def peaky_base(tmp_path_factory) -> Path:
    return save_peaky_base(tmp_path_factory.mktemp("peaky_base"))


@pytest.fixture(scope="session")
def model(peaky_base) -> LMFusionModel:
    return tiny_sampling_model(peaky_base)


@pytest.fixture(scope="session")
def eps_model(peaky_base) -> LMFusionModel:
    """The paper's DDPM objective, for the DDIM / DDPM samplers."""
    return tiny_sampling_model(peaky_base, objective="eps")


@pytest.fixture(scope="session")
def checkpoint(model, tmp_path_factory) -> Path:
    """The fixture model saved as an LMFusion checkpoint (its base is the peaky base folder)."""
    path = tmp_path_factory.mktemp("ckpt") / "model"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def pixel_codec():
    from lmfusion.codecs.pixel import PixelCodec

    return PixelCodec()


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """These models are tiny: one thread is faster than two, and far faster on a busy machine
    (idle OpenMP workers spin against other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def make_model(peaky_base):
    """A fresh model (for tests that change weights and must not touch the shared one)."""
    return lambda: tiny_sampling_model(peaky_base)


@pytest.fixture(scope="session")
def make_base():
    """Write another tiny base folder: make_base(directory, seed=...)."""
    return save_peaky_base
