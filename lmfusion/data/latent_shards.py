"""Latent shards: pre-encoded latents on disk, read a few rows at a time.

A folder holds ``shard-00000.safetensors``, ``shard-00001.safetensors``, ... (each a ``latents``
tensor [n, C, h, w] in fp16 or bf16, optionally ``latents_flipped``, and its captions as UTF-8
bytes ``captions_utf8`` with ``caption_offsets`` [n + 1], so one caption is read without parsing
all of them) and an ``index.json`` written last. The index holds the cumulative record
counts per shard, so record i -> (shard, offset) is a pure function of the index, the same in
every process and every DataLoader worker.

Reads open the shard, copy the requested rows out with ``safe_open(...).get_slice`` and close it
again. Keeping the file mapped would be faster by one header parse per batch, but every page
ever touched stays in the resident set of a mapped file, so reading a whole epoch through open
maps grows RSS to the dataset's size; closing after each read keeps it flat
(tests/data/test_latent_shards.py measures this).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from ..utils import atomic_write_bytes

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def is_shard_folder(path) -> bool:
    """Whether `path` is a finished latent-shard folder (its index.json exists)."""
    return (Path(path) / INDEX_NAME).is_file()


def write_shard(folder, number: int, latents: torch.Tensor, captions: list[str], *, dtype: str = "fp16",
                flipped: torch.Tensor | None = None, metadata: dict | None = None) -> Path:
    """Write one shard atomically (a temporary file and one rename): a half-written shard never exists."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if latents.ndim != 4 or latents.shape[0] != len(captions):
        raise ValueError(f"need latents [n, C, h, w] for n={len(captions)} captions, got {tuple(latents.shape)}")
    tensors = {"latents": latents.to(DTYPES[dtype]).contiguous()}
    if flipped is not None:
        tensors["latents_flipped"] = flipped.to(DTYPES[dtype]).contiguous()
    encoded = [caption.encode("utf-8") for caption in captions]
    tensors["caption_offsets"] = torch.tensor(np.cumsum([0] + [len(b) for b in encoded]), dtype=torch.int64)
    tensors["captions_utf8"] = torch.frombuffer(bytearray(b"".join(encoded)) or bytearray(1), dtype=torch.uint8)
    meta = {key: json.dumps(value) for key, value in (metadata or {}).items()}
    path = Path(folder) / shard_name(number)
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def shard_metadata(path) -> dict:
    """A shard's metadata (JSON values decoded), read from its header only."""
    with safe_open(str(path), framework="pt") as handle:
        return {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}


def shard_records(path) -> int:
    with safe_open(str(path), framework="pt") as handle:
        return int(handle.get_slice("latents").get_shape()[0])


def write_index(folder, *, counts: list[int], codec: dict, codec_fingerprint: str, image_size: int,
                latent_shape, dtype: str, flipped: bool, stats: dict, extra: dict | None = None) -> Path:
    """The index.json that makes the folder readable; written last, atomically."""
    index = {"format_version": FORMAT_VERSION, "codec": codec, "codec_fingerprint": codec_fingerprint,
             "image_size": int(image_size), "latent_shape": [int(v) for v in latent_shape], "dtype": dtype,
             "flipped": bool(flipped), "shards": [shard_name(i) for i in range(len(counts))],
             "cumulative": np.cumsum(counts, dtype=np.int64).tolist(), "stats": stats, **(extra or {})}
    path = Path(folder) / INDEX_NAME
    atomic_write_bytes(path, (json.dumps(index, indent=1) + "\n").encode())
    return path


def stats_summary(stats: dict) -> str:
    skipped = stats.get("skipped", {})
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
    text = f"{stats.get('source')}: seen={stats.get('seen')} ok={stats.get('ok')} skipped={sum(skipped.values())}"
    return text + (f" ({reasons})" if reasons else "")


class LatentShards:
    """Random access to a latent-shard folder: `len`, `caption(i)`, `latents(indices)`."""

    def __init__(self, folder):
        self.folder = Path(folder)
        path = self.folder / INDEX_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder} is not a finished latent-shard folder (no {INDEX_NAME}); "
                                    "run or rerun `lmfusion data encode` on it")
        self.index = json.loads(path.read_text())
        version = self.index.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: latent-shard format {version}, this version reads {FORMAT_VERSION}")
        self.cumulative = np.asarray(self.index["cumulative"], dtype=np.int64)
        self.starts = np.concatenate([[0], self.cumulative[:-1]]).astype(np.int64)
        self.stats = self.index.get("stats", {})

    def __len__(self) -> int:
        return int(self.cumulative[-1]) if len(self.cumulative) else 0

    def locate(self, record: int) -> tuple[int, int]:
        """(shard number, row inside it) of a record: a pure function of the index."""
        if not 0 <= record < len(self):
            raise IndexError(f"record {record} out of range for {len(self)} records in {self.folder}")
        shard = int(np.searchsorted(self.cumulative, record, side="right"))
        return shard, int(record - self.starts[shard])

    def caption(self, record: int) -> str:
        shard, row = self.locate(record)
        with safe_open(str(self.folder / self.index["shards"][shard]), framework="pt") as handle:
            start, stop = handle.get_slice("caption_offsets")[row:row + 2].tolist()
            return bytes(handle.get_slice("captions_utf8")[start:stop].numpy()).decode("utf-8")

    def latents(self, indices, flipped: bool = False) -> torch.Tensor:
        """float32 [len(indices), C, h, w], in the order given; reads only those rows."""
        indices = [int(i) for i in indices]
        if flipped and not self.index.get("flipped"):
            raise ValueError(f"{self.folder} holds no flipped latents (encode with --flip)")
        name = "latents_flipped" if flipped else "latents"
        out = torch.empty(len(indices), *self.index["latent_shape"], dtype=torch.float32)
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for position, record in enumerate(indices):
            shard, row = self.locate(record)
            by_shard.setdefault(shard, []).append((position, row))
        for shard, wanted in by_shard.items():
            with safe_open(str(self.folder / self.index["shards"][shard]), framework="pt") as handle:
                rows = handle.get_slice(name)
                for position, row in wanted:
                    out[position] = rows[row:row + 1][0].float()
        return out

    def stats_summary(self) -> str:
        return stats_summary(self.stats)

    def description(self) -> str:
        shape = "x".join(str(v) for v in self.index["latent_shape"])
        return (f"latent shards {self.folder} ({len(self.index['shards'])} shards, {self.index['dtype']} "
                f"{shape} latents, streamed)")

    def check_matches(self, codec_config: dict, fingerprint: str, image_size: int) -> None:
        """A one-line ValueError naming what differs from the run's codec and image size."""
        wrong = []
        if self.index.get("image_size") != image_size:
            wrong.append(f"image size {self.index.get('image_size')} != the run's {image_size}")
        if self.index.get("codec") != codec_config:
            wrong.append(f"codec {self.index.get('codec')} != the run's {codec_config}")
        elif self.index.get("codec_fingerprint") != fingerprint:
            wrong.append("codec fingerprint differs (same codec name, other weights or code)")
        if wrong:
            raise ValueError(f"latent shards {self.folder} do not match this run: " + "; ".join(wrong))


def merge_stats(source: str, parts: list[dict]) -> dict:
    """Sum {"seen", "ok", "skipped"} dicts."""
    skipped: Counter = Counter()
    for part in parts:
        skipped.update(part.get("skipped", {}))
    return {"source": source, "seen": sum(p.get("seen", 0) for p in parts), "ok": sum(p.get("ok", 0) for p in parts),
            "skipped": dict(skipped)}
