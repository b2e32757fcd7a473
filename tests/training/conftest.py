"""Shared fixtures: a tiny random base LM and a tiny shapes dataset, built once per session (offline)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmfusion.training import load_config


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from lmfusion.testing import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    from lmfusion.data import generate_shapes_dataset

    return generate_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", 12, size=16, progress=False)


@pytest.fixture
def make_config(tiny_base, shapes, tmp_path):
    """A tiny-preset TrainConfig writing under tmp_path; keyword arguments override."""

    def make(**overrides):
        values = dict(base_model=str(tiny_base), data=str(shapes), runs_dir=str(tmp_path / "runs"),
                      latent_cache=str(tmp_path / "latents"), progress=False, threads=1, log_every=1000,
                      checkpoint_every=0, max_steps=4)
        values.update(overrides)
        return load_config("tiny", overrides=values)

    return make
