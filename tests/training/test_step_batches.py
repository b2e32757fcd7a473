"""Streaming from latent shards: step-indexed batches resume exactly; training runs from a shard folder."""

from __future__ import annotations

import pytest
import torch

from lmfusion.codecs import PixelCodec
from lmfusion.data.encode_shards import encode_to_shards
from lmfusion.data.latent_shards import LatentShards, is_shard_folder
from lmfusion.training import train
from lmfusion.training.data import build_batch_source, load_or_encode
from lmfusion.training.loop import StepPlan, build_model
from lmfusion.training.step_batches import step_loader


@pytest.fixture(scope="module")
def shard_folder(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "shapes"
    encode_to_shards(str(shapes), out, PixelCodec(), 16, shard_size=5, workers=0, progress=False)
    return out


def _flat(step_and_batches):
    step, batches = step_and_batches
    return step, [(b.input_ids, b.attention_mask, b.latents) for b in batches]


def test_a_loader_started_mid_epoch_yields_what_an_uninterrupted_one_does(make_config, shard_folder):
    config = make_config(batch_size=4, micro_batch_size=2, text_only_ratio=0.2)
    model, _ = build_model(config)
    source = build_batch_source(LatentShards(shard_folder), model, config)
    plan = StepPlan(4, 2, 2)  # 12 records, 4 per step: steps 4..7 cross into the second and third epoch
    uninterrupted = [_flat(item) for item in step_loader(source, plan, 0, 0, 8, workers=0)][4:]
    resumed = [_flat(item) for item in step_loader(source, plan, 0, 4, 8, workers=1)]
    assert [s for s, _ in resumed] == [4, 5, 6, 7] == [s for s, _ in uninterrupted]
    latents_seen = 0
    for (_, a), (_, b) in zip(uninterrupted, resumed):
        for x, y in zip(a, b):
            assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
            assert (x[2] is None) == (y[2] is None)
            if x[2] is not None:
                assert torch.equal(x[2], y[2])
                latents_seen += x[2].shape[0]
    assert latents_seen > 0
    # Two processes with one chunk each draw the two chunks one process draws at step 4.
    for rank in (0, 1):
        _, (mine,) = _flat(next(iter(step_loader(source, StepPlan(4, 2, 1), rank, 4, 8, workers=0))))
        single = resumed[0][1][rank]
        assert torch.equal(mine[0], single[0]) and torch.equal(mine[2], single[2])

def test_shards_hold_the_in_memory_latents(make_config, shard_folder, shapes, tmp_path):
    memory = load_or_encode(str(shapes), 16, PixelCodec(), "none", progress=False)
    shards = LatentShards(shard_folder)
    assert [shards.caption(i) for i in range(len(shards))] == [memory.caption(i) for i in range(len(memory))]
    torch.testing.assert_close(shards.latents(range(12)), memory.latents(range(12)), atol=1e-3, rtol=0)


def test_training_runs_from_a_shard_folder_and_refuses_a_mismatch(make_config, shard_folder):
    config = make_config(data=str(shard_folder), max_steps=2, data_workers=1)
    summary = train(config)
    assert summary["steps"] == 2
    log = (config.run_dir / "train.log").read_text()
    assert "is a latent-shard folder; streaming it" in log and "12 records (latent shards" in log
    with pytest.raises(ValueError, match="do not match this run: image size 16 != the run's 32"):
        train(make_config(data=str(shard_folder), image_size=32, name="other", max_steps=1))


def test_large_raw_data_is_encoded_to_shards_in_the_latent_cache(make_config, tmp_path):
    config = make_config(memory_cache_limit_mb=0, max_steps=1)
    train(config)
    log = (config.run_dir / "train.log").read_text()
    assert "data: encoding to latent shards" in log and "vs memory_cache_limit_mb 0" in log
    folders = [p for p in (tmp_path / "latents").iterdir() if is_shard_folder(p)]
    assert len(folders) == 1 and len(LatentShards(folders[0])) == 12
    again = make_config(memory_cache_limit_mb=0, max_steps=1, name="again")
    train(again)
    assert "encoded by an earlier run" in (again.run_dir / "train.log").read_text()
