"""Training on editing triples: dropout plans, latent order, a real step (padded and packed), init_from."""

from __future__ import annotations

import pytest
import torch

from lmfusion.config import TINY_UNET
from lmfusion.data.shapes_edits import generate_shapes_edits
from lmfusion.training import train
from lmfusion.training.checkpoint import CheckpointError, load_init_weights
from lmfusion.training.data import BatchSource, ExamplePlanner, build_batch_source, open_latent_store
from lmfusion.training.edit_data import EditLatents
from lmfusion.training.loop import build_model


@pytest.fixture(scope="module")
def edit_data(tmp_path_factory):
    return generate_shapes_edits(tmp_path_factory.mktemp("edits") / "set", 12, size=16, seed=0, progress=False)


def test_planner_drops_instruction_source_and_both_at_the_given_rate():
    planner = ExamplePlanner(50, seed=0, edit=True, edit_dropout=0.05)
    plans = [planner.plan(p) for p in range(6000)]
    assert all(p.kind == "edit" for p in plans)
    cases = {(False, False): 0, (True, False): 0, (False, True): 0, (True, True): 0}
    for p in plans:
        cases[(p.drop_caption, p.drop_source)] += 1
    for dropped in ((True, False), (False, True), (True, True)):
        assert 0.035 < cases[dropped] / len(plans) < 0.065, cases
    assert planner.plan(123) == plans[123]  # a pure function of (seed, position)


class _Builder:
    """Records what BatchSource asks for; the layout itself is tested in tests/model."""

    def edit(self, instruction, drop_source=False, drop_instruction=False):
        return (instruction, drop_source, drop_instruction)

    def collate(self, examples, latents):
        return examples, latents


def test_latents_come_in_reading_order_source_then_target():
    sources, targets = torch.arange(4.0).view(4, 1, 1, 1), 10 + torch.arange(4.0).view(4, 1, 1, 1)
    data = EditLatents(sources, targets, ["a", "b", "c", "d"], {})

    class Fixed(ExamplePlanner):
        def plan(self, position):
            from lmfusion.training.data import Plan

            return Plan(position, "edit", drop_source=position == 1)

    source = BatchSource(data, _Builder(), Fixed(4, 0, edit=True))
    (examples, latents), _ = source.batch(range(3))
    assert [e[0] for e in examples] == ["a", "b", "c"]
    assert latents.flatten().tolist() == [0, 10, 11, 2, 12]  # record 1 dropped its source


@pytest.mark.parametrize("pack_length", [0, 96])
def test_one_training_step_on_edit_data(make_config, edit_data, pack_length):
    config = make_config(data=str(edit_data), max_steps=1, batch_size=4, pack_length=pack_length, probe_every=5,
                         sample_every=1, sample_steps=2)
    summary = train(config)
    final = summary["final"]
    assert final["images"] == 4  # one scored target per example; the sources carry no loss
    assert torch.isfinite(torch.tensor([final["loss"], final["text_loss"], final["image_loss"]])).all()
    log = (config.run_dir / "train.log").read_text()
    assert "editing triples" in log and "probes: skipped for editing data" in log
    if pack_length:
        assert final["packing_efficiency"] > 0.5
    samples = (config.run_dir / "samples" / "step_000001.txt").read_text()
    assert "rows: sources, edits, targets" in samples and "sample writing failed" not in log


def test_edit_store_is_cached_and_too_large_sets_are_refused(make_config, edit_data):
    config = make_config(data=str(edit_data))
    model, codec = build_model(config)
    store = open_latent_store(config, codec, progress=False, say=lambda _: None)
    again = open_latent_store(config, codec, progress=False, say=lambda _: None)
    assert isinstance(store, EditLatents) and len(store) == len(again) > 0 and again.from_cache
    assert torch.equal(store.sources, again.sources) and not torch.equal(store.sources, store.targets)
    batch, plans = build_batch_source(store, model, config).batch(range(4))
    assert batch.latents.shape[0] == 4 + sum(not p.drop_source for p in plans) and batch.num_loss_images == 4
    tight = make_config(data=str(edit_data), memory_cache_limit_mb=0.001, latent_cache="none")
    with pytest.raises(ValueError, match="over memory_cache_limit_mb"):
        open_latent_store(tight, codec, progress=False, say=lambda _: None)


def test_init_from_loads_adapter_weights_and_refuses_another_model(make_config, tmp_path):
    config = make_config()
    first, _ = build_model(config)
    with torch.no_grad():
        first.image_out.conv_out.weight.add_(1.0)
    first.save_pretrained(tmp_path / "start")
    second, _ = build_model(config)
    assert not torch.equal(second.image_out.conv_out.weight, first.image_out.conv_out.weight)
    load_init_weights(second, tmp_path / "start", say=lambda _: None)
    for key, value in first.adapter_state_dict().items():
        assert torch.equal(second.adapter_state_dict()[key], value), key
    other, _ = build_model(make_config(model={"objective": "eps"}))
    with pytest.raises(ValueError, match="differs from this run's in \\['objective'\\]"):
        load_init_weights(other, tmp_path / "start", say=lambda _: None)
    wider, _ = build_model(make_config(model={"unet_channels": 2 * TINY_UNET["unet_channels"]}))
    with pytest.raises(ValueError, match=f"U-Net blocks are {TINY_UNET['unet_channels']} channels wide.*--model"):
        load_init_weights(wider, tmp_path / "start", say=lambda _: None)
    # Norm groups change no weight's shape, so only this check stands between them and a silent load.
    regrouped, _ = build_model(make_config(model={"unet_norm_groups": TINY_UNET["unet_norm_groups"] // 2}))
    with pytest.raises(ValueError, match="U-Net blocks are .*unet_norm_groups: 8"):
        load_init_weights(regrouped, tmp_path / "start", say=lambda _: None)


def test_init_from_a_model_without_patch_positions_gains_a_zero_table(make_config, tmp_path):
    """An editing run may add the learned patch-position table on top of a quickstart-style model."""
    start, _ = build_model(make_config())
    start.save_pretrained(tmp_path / "start")
    said = []
    gaining, _ = build_model(make_config(model={**TINY_UNET, "image_position_embedding": "learned"}))
    with torch.no_grad():
        gaining.image_in.position.fill_(1.0)
    load_init_weights(gaining, tmp_path / "start", say=said.append)
    assert torch.count_nonzero(gaining.image_in.position) == 0 and "starts at zero" in said[0]
    for key, value in start.adapter_state_dict().items():
        assert torch.equal(gaining.adapter_state_dict()[key], value), key
    gaining.save_pretrained(tmp_path / "with_table")
    losing, _ = build_model(make_config())  # the other way round would drop trained weights: refused
    with pytest.raises(CheckpointError, match="unexpected \\['image_in.position'\\]"):
        load_init_weights(losing, tmp_path / "with_table", say=lambda _: None)


@pytest.mark.parametrize("condition", ["previous", "residual"])
def test_init_from_a_model_without_the_previous_image_input_gains_zero_channels(make_config, tmp_path, condition):
    """An editing run may add image_condition "previous" (or "residual") on top of a quickstart-style model."""
    start, _ = build_model(make_config())
    start.save_pretrained(tmp_path / "start")
    said = []
    gaining, _ = build_model(make_config(model={**TINY_UNET, "image_condition": condition}))
    load_init_weights(gaining, tmp_path / "start", say=said.append)
    weight = gaining.image_in.conv_in.weight
    channels = start.image_in.conv_in.weight.shape[1]
    assert torch.count_nonzero(weight[:, channels:]) == 0 and "previous-image input channels" in said[0]
    assert torch.equal(weight[:, :channels], start.image_in.conv_in.weight)


def test_webdataset_edits_train_when_the_task_says_edit(make_config, edit_data, tmp_path):
    """Tar shards look like caption shards from outside: `task: edit` says what they hold."""
    import io
    import json
    import tarfile

    rows = [json.loads(line) for line in (edit_data / "train" / "edits.jsonl").read_text().splitlines()][:4]
    shard = tmp_path / "edits-000.tar"
    with tarfile.open(shard, "w") as tar:
        for k, row in enumerate(rows):
            members = {"source.png": (edit_data / "train" / row["source"]).read_bytes(),
                       "target.png": (edit_data / "train" / row["target"]).read_bytes(),
                       "instruction.txt": row["instruction"].encode()}
            for name, blob in members.items():
                info = tarfile.TarInfo(f"{k:04d}.{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    config = make_config(data=str(shard), task="edit", max_steps=1, batch_size=4, probe_every=0)
    assert train(config)["final"]["images"] == 4
    with pytest.raises(ValueError, match="task must be one of"):
        make_config(data=str(shard), task="edits")
