"""Training with packed rows: same step as padded rows, packing efficiency in the log; flex needs a GPU."""

import json

import pytest

from lmfusion.training import train
from lmfusion.training.data import build_batch_source, load_or_encode
from lmfusion.training.loop import build_model


def test_packed_training_logs_its_efficiency_and_matches_padded_losses(make_config):
    padded = train(make_config(name="padded", max_steps=2, batch_size=8))
    packed = train(make_config(name="packed", max_steps=2, batch_size=8, pack_length=128))
    for a, b in zip(padded["history"], packed["history"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["tokens"] == a["tokens"]
    lines = open(packed["run_dir"] + "/metrics.jsonl").read().splitlines()
    assert all(0 < json.loads(line)["packing_efficiency"] <= 1 for line in lines)


def test_packed_batches_have_fewer_rows(make_config):
    config = make_config(pack_length=128)
    model, codec = build_model(config)
    source = build_batch_source(load_or_encode(config.data, config.image_size, codec, config.latent_cache), model, config)
    batch, _ = source.batch(range(8))
    assert batch.input_ids.shape == (batch.input_ids.shape[0], 128) and batch.input_ids.shape[0] < 8
    assert batch.document_ids.max() == 7


def test_flex_training_on_a_cpu_is_refused(make_config):
    with pytest.raises(ValueError, match="flex trains only on a GPU"):
        train(make_config(name="flex", attention="flex"))
