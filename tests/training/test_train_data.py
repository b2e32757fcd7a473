"""Training data: the 80/20 order ratio, caption dropout, batches, the latent cache, bad data."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from lmfusion.codecs import PixelCodec
from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.testing import tiny_lmfusion_config
from lmfusion.training.data import BatchSource, CaptionLatents, ExamplePlanner, load_or_encode
from lmfusion.model.sequence import SequenceBuilder


def test_order_ratio_and_caption_dropout():
    planner = ExamplePlanner(97, seed=0, image_first_ratio=0.2, caption_dropout=0.1)
    plans = [planner.plan(p) for p in range(20000)]
    kinds = Counter(p.kind for p in plans)
    assert kinds["text"] == 0
    assert kinds["image_first"] / len(plans) == pytest.approx(0.2, abs=0.015)
    caption_first = [p for p in plans if p.kind == "caption_first"]
    assert np.mean([p.drop_caption for p in caption_first]) == pytest.approx(0.1, abs=0.01)
    assert not any(p.drop_caption for p in plans if p.kind == "image_first")


def test_plans_are_a_pure_function_of_seed_and_position():
    a, b = ExamplePlanner(10, 3, text_only_ratio=0.3), ExamplePlanner(10, 3, text_only_ratio=0.3)
    assert [a.plan(p) for p in range(50)] == [b.plan(p) for p in reversed(range(50))][::-1]
    assert sorted(a.plan(p).record for p in range(10, 20)) == list(range(10))  # each epoch: a permutation
    assert [a.plan(p).record for p in range(10)] != [a.plan(p).record for p in range(10, 20)]
    assert Counter(a.plan(p).kind for p in range(4000))["text"] / 4000 == pytest.approx(0.3, abs=0.03)
    assert [ExamplePlanner(10, 4).plan(p) for p in range(20)] != [ExamplePlanner(10, 3).plan(p) for p in range(20)]


@pytest.fixture(scope="module")
def tiny_model(tiny_base):
    return LMFusionModel.from_text_model(str(tiny_base), tiny_lmfusion_config())


def test_batches_lay_out_examples_and_latents(tiny_model):
    captions = [f"a small red circle {i}" for i in range(6)]
    data = CaptionLatents(torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 16, 16).contiguous(), captions, {})
    m = tiny_model
    builder = SequenceBuilder(m.tokenizer, m.boi_token_id, m.eoi_token_id, m.config.tokens_per_image, 64)
    source = BatchSource(data, builder, ExamplePlanner(6, 0, image_first_ratio=0.5, caption_dropout=0.5, text_only_ratio=0.2))
    batch, plans = source.batch(range(12))
    with_images = [p for p in plans if p.kind != "text"]
    assert batch.latents.shape[0] == len(with_images)
    assert batch.latents[:, 0, 0, 0].tolist() == [float(p.record) for p in with_images]  # reading order
    caps = iter(batch.max_timesteps.tolist())
    for row, plan in enumerate(plans):
        ids = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        if plan.kind == "text":
            assert not batch.image_mask[row].any()
            continue
        cap = next(caps)
        starts_with_image = ids[0] == m.boi_token_id
        assert starts_with_image == (plan.kind == "image_first" or plan.drop_caption)
        assert cap == (500 if plan.kind == "image_first" else 1000)
        if plan.drop_caption:  # the CFG unconditional layout: BOI, patches, EOI, eos only
            assert len(ids) == m.config.tokens_per_image + 3


class CountingCodec(PixelCodec):
    def __init__(self, tag: str = "a"):
        super().__init__()
        self.tag, self.calls = tag, 0

    def _encode(self, images):
        self.calls += len(images) > 1  # count dataset batches, not the 1-image cache-key probe
        return super()._encode(images)

    def config(self):
        return {"name": "pixel", "tag": self.tag}


class ShiftedCodec(PixelCodec):
    def _encode(self, images):  # same config() as PixelCodec, different output: e.g. changed weights
        return super()._encode(images) + 0.5


def test_latent_cache_is_reused_and_keyed_by_dataset_and_codec(shapes, tmp_path):
    codec = CountingCodec()
    first = load_or_encode(str(shapes), 16, codec, str(tmp_path))
    assert codec.calls > 0 and not first.from_cache and first.cache_path.suffix == ".safetensors"
    assert first.tensor.shape == (12, 3, 16, 16) and first.stats["ok"] == 12
    codec.calls = 0
    again = load_or_encode(str(shapes), 16, codec, str(tmp_path))
    assert codec.calls == 0 and again.from_cache and again.cache_path == first.cache_path
    assert torch.equal(again.tensor, first.tensor) and again.captions_list == first.captions_list
    other = CountingCodec("b")
    load_or_encode(str(shapes), 16, other, str(tmp_path))
    assert other.calls > 0 and len(list(tmp_path.glob("*.safetensors"))) == 2
    shifted = load_or_encode(str(shapes), 16, ShiftedCodec(), str(tmp_path))
    assert not shifted.from_cache and len(list(tmp_path.glob("*.safetensors"))) == 3
    off = CountingCodec()
    load_or_encode(str(shapes), 16, off, "none")
    assert off.calls > 0 and len(list(tmp_path.glob("*.safetensors"))) == 3


def test_editing_the_data_replaces_its_latent_cache(shapes, tmp_path):
    """A changed dataset gets a new cache file and the old one goes; other codecs' files stay."""
    own, cache = tmp_path / "own", tmp_path / "cache"
    shutil.copytree(shapes, own)
    before = load_or_encode(str(own), 16, CountingCodec(), str(cache))
    other_codec = load_or_encode(str(own), 16, CountingCodec("b"), str(cache))
    image = sorted(own.glob("*.png"))[0]
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    edited = load_or_encode(str(own), 16, CountingCodec(), str(cache))
    assert not edited.from_cache and edited.cache_path != before.cache_path
    assert not before.cache_path.exists() and other_codec.cache_path.exists()
    assert sorted(cache.glob("*.safetensors")) == sorted([edited.cache_path, other_codec.cache_path])


def _imagefolder(root, rows):
    root.mkdir()
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_bad_records_are_counted_and_an_empty_dataset_is_a_clear_error(shapes, tmp_path):
    good = sorted(p.name for p in shapes.glob("*.png"))[:2]
    root = _imagefolder(tmp_path / "mixed", [
        {"file_name": good[0], "text": "a red circle"}, {"file_name": good[1], "text": "  "},
        {"file_name": "missing.png", "text": "gone"}, {"file_name": "broken.png", "text": "broken"},
    ])
    for name in good:
        shutil.copy(shapes / name, root / name)
    (root / "broken.png").write_bytes(b"not a png")
    data = load_or_encode(str(root), 16, PixelCodec(), "none", progress=False)
    assert len(data) == 1 and data.stats["ok"] == 1 and sum(data.stats["skipped"].values()) == 3
    assert "skipped=3" in data.stats_summary()
    empty = _imagefolder(tmp_path / "empty", [{"file_name": "missing.png", "text": "gone"}])
    with pytest.raises(ValueError, match="no usable"):
        load_or_encode(str(empty), 16, PixelCodec(), "none", progress=False)


def test_probes_read_the_held_out_split_when_there_is_one(tmp_path):
    from lmfusion.data import generate_shapes_dataset
    from lmfusion.training.data import probe_records

    split = generate_shapes_dataset(tmp_path / "split", 40, size=16, progress=False, split=True, test_fraction=0.2)
    latents, captions, source = probe_records(str(split), 16, PixelCodec(), 5)
    test_captions = [json.loads(line)["text"] for line in (split / "test" / "metadata.jsonl").read_text().splitlines()]
    assert (source, captions, latents.shape) == ("held-out test split", test_captions[:5], (5, 3, 16, 16))
    flat = generate_shapes_dataset(tmp_path / "flat", 6, size=16, progress=False)
    _, captions, source = probe_records(str(flat), 16, PixelCodec(), 10)
    assert source == "first training records" and len(captions) == 6
