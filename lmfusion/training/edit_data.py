"""Editing triples as training data: both images' latents, encoded once and cached like captions.

An edit record holds two images, so it does not fit the one-image-per-record latent shards;
editing sets are small (the paper fine-tunes on ~8K triples), and they are held in memory, in
the same latent cache folder and under the same (data, size, codec) key as caption latents.
A set too large for `memory_cache_limit_mb` is refused with that reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from safetensors.torch import load_file, save

from ..data.edits import is_edit_dataset, open_edit_dataset
from ..data.fingerprints import codec_fingerprint
from ..data.formats import NoUsableDataError
from ..data.latent_shards import stats_summary
from ..utils import atomic_write_bytes
from .config import TASKS


@dataclass
class EditLatents:
    """An editing set in memory: clean source and target latents [N, C, h, w] and instructions.

    `latents(i)` and `caption(i)` are the record's target and instruction, so code written for
    caption stores (the sample grids' reference row) shows what an edit should produce.
    """

    sources: torch.Tensor
    targets: torch.Tensor
    instructions: list[str]
    stats: dict
    cache_path: Path | None = None
    from_cache: bool = False
    is_edit = True

    def __len__(self) -> int:
        return len(self.instructions)

    def caption(self, record: int) -> str:
        return self.instructions[record]

    def latents(self, indices) -> torch.Tensor:
        return self.targets[torch.as_tensor(list(indices), dtype=torch.long)].float()

    def source_latents(self, indices) -> torch.Tensor:
        return self.sources[torch.as_tensor(list(indices), dtype=torch.long)].float()

    def stats_summary(self) -> str:
        return stats_summary(self.stats)

    def description(self) -> str:
        kind = f"cached latents {self.cache_path}" if self.from_cache else "freshly encoded, in memory"
        return f"editing triples, {kind}"


def wants_edit_data(config) -> bool:
    """Whether the run trains on editing triples: `task: edit`, or `auto` and an edits.jsonl layout."""
    if config.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {config.task!r}")
    return config.task == "edit" or (config.task == "auto" and is_edit_dataset(config.data))


def encode_edits(data: str, image_size: int, codec, limit_mb: float, batch: int = 64,
                 progress: bool = True) -> EditLatents:
    """Read every usable triple once and encode both images; bad rows are counted, not fatal.
    `progress`: a bar over the triples (minutes for thousands on a CPU)."""
    try:
        dataset = open_edit_dataset(data, image_size)
    except NoUsableDataError as error:
        raise ValueError(f"no usable training data: {error}") from None
    if hasattr(dataset, "__len__"):
        channels, height, width = codec.latent_shape(image_size)
        megabytes = 2 * len(dataset) * channels * height * width * 4 / 2**20
        if megabytes > limit_mb:
            raise ValueError(f"editing data {data}: {len(dataset)} triples need {megabytes:.0f} MiB of fp32 latents, "
                             f"over memory_cache_limit_mb {limit_mb:g}; editing sets are held in memory (latent "
                             "shards hold one image per record): raise the limit or use fewer triples")
        records = (dataset[i] for i in range(len(dataset)))
    else:
        records = iter(dataset)
    chunks, instructions, pending = {"sources": [], "targets": []}, [], []

    def flush():
        for key, index in (("sources", 0), ("targets", 1)):
            chunks[key].append(codec.encode(torch.stack([p[index] for p in pending])).float().cpu())
        pending.clear()

    with torch.no_grad():
        total = len(dataset) if hasattr(dataset, "__len__") else None
        for record in tqdm(records, total=total, desc="encoding editing triples", unit="triple", disable=not progress):
            pending.append((record.source, record.target))
            instructions.append(record.instruction)
            if len(pending) == batch:
                flush()
        if pending:
            flush()
    stats = dataset.stats
    stats_dict = {"source": stats.source, "seen": stats.seen, "ok": stats.ok, "skipped": dict(stats.skipped)}
    if not instructions:
        raise ValueError(f"no usable editing triples in {data}: {stats.summary()}")
    return EditLatents(torch.cat(chunks["sources"]), torch.cat(chunks["targets"]), instructions, stats_dict)


def open_edit_store(config, codec, say=print) -> EditLatents:
    """The run's triples from the latent cache, encoding and caching them on a miss."""
    from .data import cache_file, drop_superseded  # the caption cache's naming and clean-up

    path = cache_file(config.data, config.image_size, codec, config.latent_cache)
    if path is not None:  # "<data>-edits-<key>": drop_superseded then finds this file's older versions
        stem, key = path.stem.rsplit("-", 1)
        path = path.with_name(f"{stem}-edits-{key}.safetensors")
    if path is not None and path.is_file():
        say("data: editing triples in memory (latents cached by an earlier run)")
        return read_edit_cache(path)
    say("data: encoding editing triples into memory")
    encoded = encode_edits(config.data, config.image_size, codec, config.memory_cache_limit_mb,
                           progress=config.progress)
    if path is not None:
        meta = {"instructions": json.dumps(encoded.instructions), "stats": json.dumps(encoded.stats),
                "data": str(config.data), "codec": json.dumps(codec.config()), "image_size": str(config.image_size),
                "probe": codec_fingerprint(codec, config.image_size), "kind": "edit"}
        tensors = {"sources": encoded.sources.contiguous(), "targets": encoded.targets.contiguous()}
        atomic_write_bytes(path, save(tensors, metadata=meta))
        encoded.cache_path = path
        drop_superseded(path, meta)
    return encoded


def read_edit_cache(path: Path) -> EditLatents:
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(path))
    return EditLatents(tensors["sources"], tensors["targets"], json.loads(meta["instructions"]),
                       json.loads(meta["stats"]), path, from_cache=True)
