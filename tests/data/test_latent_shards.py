"""Latent shards: writer/reader round trip, index checks, `lmfusion data encode` (resume, bad images), flat RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmfusion.codecs import PixelCodec
from lmfusion.data import generate_shapes_dataset
from lmfusion.data import encode_shards
from lmfusion.data.encode_shards import encode_to_shards
from lmfusion.data.fingerprints import codec_fingerprint
from lmfusion.data.latent_shards import LatentShards, is_shard_folder, shard_metadata, write_index, write_shard

REPO = Path(__file__).resolve().parents[2]


def _write_set(folder: Path, counts: list[int], shape=(2, 4, 4), flipped=False) -> torch.Tensor:
    """Shards whose record r holds the value r everywhere (exact in fp16 below 2048)."""
    values, start = [], 0
    for number, count in enumerate(counts):
        latents = torch.arange(start, start + count, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, *shape)
        write_shard(folder, number, latents, [f"caption {r} é" for r in range(start, start + count)],
                    flipped=-latents if flipped else None)
        values.append(latents)
        start += count
    write_index(folder, counts=counts, codec={"name": "pixel"}, codec_fingerprint="abc", image_size=16,
                latent_shape=shape, dtype="fp16", flipped=flipped, stats={"source": "x", "seen": start, "ok": start})
    return torch.cat(values)


def test_round_trip_reads_the_requested_rows_in_order(tmp_path):
    expected = _write_set(tmp_path, [5, 0, 3, 4], flipped=True)
    store = LatentShards(tmp_path)
    assert len(store) == 12 and is_shard_folder(tmp_path)
    assert [store.locate(r) for r in (0, 4, 5, 7, 8, 11)] == [(0, 0), (0, 4), (2, 0), (2, 2), (3, 0), (3, 3)]
    order = [11, 0, 6, 6, 3, 8]
    got = store.latents(order)
    assert got.dtype == torch.float32 and torch.equal(got, expected[order])
    assert torch.equal(store.latents(order, flipped=True), -expected[order])
    assert [store.caption(r) for r in order] == [f"caption {r} é" for r in order]
    with pytest.raises(IndexError):
        store.locate(12)


def test_index_checks_name_the_mismatch(tmp_path):
    with pytest.raises(FileNotFoundError, match="no index.json"):
        LatentShards(tmp_path)
    _write_set(tmp_path, [3])
    store = LatentShards(tmp_path)
    store.check_matches({"name": "pixel"}, "abc", 16)
    with pytest.raises(ValueError, match="image size 16 != the run's 32"):
        store.check_matches({"name": "pixel"}, "abc", 32)
    with pytest.raises(ValueError, match="codec .* != the run's"):
        store.check_matches({"name": "taef2"}, "abc", 16)
    with pytest.raises(ValueError, match="fingerprint differs"):
        store.check_matches({"name": "pixel"}, "other", 16)
    with pytest.raises(ValueError, match="holds no flipped latents"):
        store.latents([0], flipped=True)
    index = json.loads((tmp_path / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps(dict(index, format_version=99)))
    with pytest.raises(ValueError, match="format 99"):
        LatentShards(tmp_path)


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory) -> Path:
    return generate_shapes_dataset(tmp_path_factory.mktemp("src") / "shapes", 20, size=16, progress=False)


def _contents(folder: Path) -> dict:
    return {p.name: (load_file(str(p)), shard_metadata(p)) for p in sorted(folder.glob("shard-*.safetensors"))}


def test_interrupted_encode_resumes_to_identical_shards(shapes_folder, tmp_path, monkeypatch):
    whole = encode_to_shards(str(shapes_folder), tmp_path / "whole", PixelCodec(), 16, shard_size=6, workers=0,
                             batch_size=4, progress=False)
    assert len(whole) == 20 and len(whole.index["shards"]) == 4
    real_write, calls = encode_shards._Encoder.write, []

    def write_then_die(self, number, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C between two shards
        calls.append(number)
        real_write(self, number, *args)

    monkeypatch.setattr(encode_shards._Encoder, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        encode_to_shards(str(shapes_folder), tmp_path / "cut", PixelCodec(), 16, shard_size=6, progress=False)
    cut = tmp_path / "cut"
    assert sorted(p.name for p in cut.iterdir()) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    with pytest.raises(FileNotFoundError):
        LatentShards(cut)
    monkeypatch.setattr(encode_shards._Encoder, "write", real_write)
    mtime = (cut / "shard-00000.safetensors").stat().st_mtime_ns
    resumed = encode_to_shards(str(shapes_folder), cut, PixelCodec(), 16, shard_size=6, workers=0, progress=False)
    assert (cut / "shard-00000.safetensors").stat().st_mtime_ns == mtime  # kept, not rewritten
    a, b = _contents(tmp_path / "whole"), _contents(cut)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0].keys() == b[name][0].keys() == {"latents", "caption_offsets", "captions_utf8"}
        assert all(torch.equal(a[name][0][key], b[name][0][key]) for key in a[name][0]) and a[name][1] == b[name][1]
    assert resumed.index["cumulative"] == whole.index["cumulative"] and resumed.stats == whole.stats
    with pytest.raises(ValueError, match="another encode \\(differs in dtype\\)"):
        encode_to_shards(str(shapes_folder), cut, PixelCodec(), 16, shard_size=6, dtype="bf16", progress=False)


def test_cli_encode_skips_and_counts_a_corrupt_image(shapes_folder, tmp_path):
    source = tmp_path / "src"
    subprocess.run(["cp", "-r", str(shapes_folder), str(source)], check=True)
    victim = sorted(source.rglob("*.png"))[3]
    victim.write_bytes(b"not an image")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    out = tmp_path / "shards"
    done = subprocess.run([sys.executable, "-m", "lmfusion.cli", "data", "encode", "--data", str(source), "--out", str(out),
                           "--codec", "{name: pixel}", "--image-size", "16", "--shard-size", "8", "--workers", "1",
                           "--flip", "--no-progress"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    store = LatentShards(out)
    assert len(store) == 19 and "skipped=1" in done.stdout
    assert store.stats["ok"] == 19 and sum(store.stats["skipped"].values()) == 1
    assert torch.allclose(store.latents([5], flipped=True), store.latents([5]).flip(-1), atol=1e-3)
    assert store.index["codec_fingerprint"] == codec_fingerprint(PixelCodec(), 16)


# Peak RSS from /proc (VmHWM, kB): it belongs to this process's own memory map, whereas getrusage's
# ru_maxrss survives exec and would report the (large) pytest parent that forked the reader.
_READ_ALL = """
import sys
import numpy as np
from lmfusion.data.latent_shards import LatentShards
for folder in sys.argv[1:]:  # smallest first: the peak after each read-through
    store = LatentShards(folder)
    order = np.random.default_rng(0).permutation(len(store))
    for start in range(0, len(order), 64):
        rows = order[start:start + 64]
        store.latents(rows)
        [store.caption(int(r)) for r in rows]
    print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def test_peak_rss_does_not_grow_with_the_dataset(tmp_path):
    """Every record of 2k, then of 20k records of 4 KiB (80 MB in fp16: more than 10% of the reader's RSS)."""
    folders = []
    for n in (2000, 20000):
        folder = tmp_path / str(n)
        counts = [1000] * (n // 1000)
        for number in range(len(counts)):
            write_shard(folder, number, torch.randn(1000, 8, 16, 16), [f"c{number}-{i}" for i in range(1000)])
        write_index(folder, counts=counts, codec={"name": "pixel"}, codec_fingerprint="x", image_size=64,
                    latent_shape=(8, 16, 16), dtype="fp16", flipped=False, stats={})
        folders.append(str(folder))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _READ_ALL, *folders], env=env, capture_output=True, text=True,
                          timeout=600, check=True)
    small, large = (int(v) for v in done.stdout.split())
    assert 20000 * 8 * 16 * 16 * 2 / 1024 > 0.1 * small  # holding the data would fail the check below
    assert large <= 1.1 * small, (small, large)


def test_a_webdataset_encode_resumes_by_reading_the_stream_again(shapes_folder, tmp_path):
    import webdataset as wds

    rows = [json.loads(line) for line in (shapes_folder / "metadata.jsonl").read_text().splitlines()]
    for part in range(2):
        with wds.TarWriter(str(tmp_path / f"part-{part}.tar")) as writer:
            for i, row in enumerate(rows[part * 10:(part + 1) * 10]):
                writer.write({"__key__": f"{part}_{i}", "png": (shapes_folder / row["file_name"]).read_bytes(),
                              "txt": row["text"]})
    spec = str(tmp_path / "part-{0..1}.tar")
    whole = encode_to_shards(spec, tmp_path / "whole", PixelCodec(), 16, shard_size=6, workers=0, progress=False)
    assert whole.index["cumulative"] == [6, 12, 18, 20] and whole.stats["ok"] == 20
    subprocess.run(["cp", "-r", str(tmp_path / "whole"), str(tmp_path / "cut")], check=True)
    for name in ("index.json", "shard-00002.safetensors", "shard-00003.safetensors"):
        (tmp_path / "cut" / name).unlink()
    resumed = encode_to_shards(spec, tmp_path / "cut", PixelCodec(), 16, shard_size=6, workers=0, progress=False)
    assert resumed.index["cumulative"] == whole.index["cumulative"] and resumed.stats == whole.stats
    assert torch.equal(resumed.latents(range(20)), whole.latents(range(20)))
    assert [resumed.caption(i) for i in range(20)] == [whole.caption(i) for i in range(20)]
