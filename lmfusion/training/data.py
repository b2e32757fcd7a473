"""Training data: caption records -> pre-encoded latents -> interleaved training batches.

Two decisions shape this module:

* Latents are encoded ONCE per (dataset, image size, codec) and cached as safetensors. The codec
  is frozen, so re-encoding the same images every epoch would only burn time (for TAEF2 on a CPU
  the encoder costs about as much as a training step of a small model).
* Every random choice about an example (which record, caption-first or image-first, caption
  dropped, text-only) is a pure function of (seed, global sample position). Batches therefore do
  not depend on how many processes share the work or on where a run was interrupted: resuming
  at step s, or running on 2 ranks instead of 1, draws exactly the same examples.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Protocol
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from ..data.fingerprints import codec_fingerprint, dataset_fingerprint  # noqa: F401 (re-exported)
from ..data.latent_shards import stats_summary
from ..data.shapes_chat import user_turn_ids
from ..model.sequence import Example, MultimodalBatch, SequenceBuilder
from ..utils import atomic_write_bytes
from .chat_data import open_chat_store, wants_chat_data
from .edit_data import open_edit_store, wants_edit_data

CACHE_FORMAT = 1  # bump when the cached content changes meaning
_PLAN_SALT = 0x5EED  # separates the per-example draws from any other use of the seed


def ensure_dataset(config) -> None:
    """Generate the shapes dataset (or shapes edits) at `config.data` when asked to and it is missing."""
    # a chat run's editing set is the one mixed in (chat_edit_data); `data` holds the conversations
    edits_at = config.chat_edit_data if config.task == "chat" else config.data
    if config.generate_shapes_edits and edits_at and not Path(edits_at).exists():
        from ..data.shapes_edits import generate_shapes_edits

        generate_shapes_edits(edits_at, config.generate_shapes_edits, size=config.image_size, seed=0,
                              progress=config.progress)
    if config.generate_shapes_chat and not Path(config.data).exists():
        from ..data.shapes_chat import generate_shapes_chat

        generate_shapes_chat(config.data, config.generate_shapes_chat, base_model=config.base_model,
                             size=config.image_size, seed=0, progress=config.progress)
    if config.generate_shapes and not Path(config.data).exists():
        from ..data import generate_shapes_dataset

        generate_shapes_dataset(config.data, config.generate_shapes, size=config.image_size, seed=0,
                                progress=config.progress, split=True, two_object_prob=config.shapes_two_object_prob)


# --------------------------------------------------------------------------- latent cache
class LatentStore(Protocol):
    """What BatchSource and the loop need of a dataset: records by number, latents by row.

    `CaptionLatents` holds a small dataset in memory; `lmfusion.data.LatentShards` reads a large
    one from disk a few rows at a time. Both return CPU float32 latents; batches move to the
    device per step.
    """

    def __len__(self) -> int: ...

    def caption(self, record: int) -> str: ...

    def latents(self, indices) -> torch.Tensor: ...

    stats: dict  # {"source", "seen", "ok", "skipped": {reason: count}}

    def stats_summary(self) -> str: ...

    def description(self) -> str: ...


@dataclass
class CaptionLatents:
    """A whole dataset in memory: clean latents [N, C, h, w] plus its captions and skip statistics."""

    tensor: torch.Tensor
    captions_list: list[str]
    stats: dict  # {"source", "seen", "ok", "skipped": {reason: count}}
    cache_path: Path | None = None
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.captions_list)

    def caption(self, record: int) -> str:
        return self.captions_list[record]

    def latents(self, indices) -> torch.Tensor:
        return self.tensor[torch.as_tensor(list(indices), dtype=torch.long)].float()

    def stats_summary(self) -> str:
        return stats_summary(self.stats)

    def description(self) -> str:
        return f"cached latents {self.cache_path}" if self.from_cache else "freshly encoded, in memory"


def cache_key(data: str, image_size: int, codec) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, "data": dataset_fingerprint(data), "size": image_size,
                       "codec": codec.config(), "probe": codec_fingerprint(codec, image_size)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def default_cache_dir() -> Path:
    from ..base_models import cache_dir

    return cache_dir() / "latents"


def cache_file(data: str, image_size: int, codec, cache_dir: str) -> Path | None:
    """Where the latents of (data, size, codec) live; None when caching is off."""
    if cache_dir == "none":
        return None
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(data)).name) or "data"
    return folder / f"{stem}-{cache_key(data, image_size, codec)}.safetensors"


def encode_dataset(data: str, image_size: int, codec, batch: int = 64, progress: bool = True) -> CaptionLatents:
    """Read every usable record once and encode its image. Bad records are counted, not fatal."""
    from tqdm.auto import tqdm

    from ..data import NoUsableDataError, open_caption_dataset

    try:
        dataset = open_caption_dataset(data, image_size)
        records = iter(dataset) if not hasattr(dataset, "__len__") else (dataset[i] for i in range(len(dataset)))
        chunks, captions, pending = [], [], []
        for record in tqdm(records, desc="encoding latents", unit="img", disable=not progress):
            pending.append(record.image)
            captions.append(record.caption)
            if len(pending) == batch:
                chunks.append(codec.encode(torch.stack(pending)).float().cpu())
                pending = []
        if pending:
            chunks.append(codec.encode(torch.stack(pending)).float().cpu())
    except NoUsableDataError as error:  # the CLI reports ValueErrors as one clear line
        raise ValueError(f"no usable training data: {error}") from None
    stats = dataset.stats
    stats_dict = {"source": stats.source, "seen": stats.seen, "ok": stats.ok, "skipped": dict(stats.skipped)}
    if not captions:
        raise ValueError(f"no usable training data in {data}: {stats.summary()}")
    return CaptionLatents(torch.cat(chunks), captions, stats_dict)


def load_or_encode(data: str, image_size: int, codec, cache_dir: str = "", progress: bool = True) -> CaptionLatents:
    """The dataset's latents from the cache, encoding and caching them on a miss."""
    path = cache_file(data, image_size, codec, cache_dir)
    if path is not None and path.is_file():
        return read_cache(path)
    encoded = encode_dataset(data, image_size, codec, progress=progress)
    if path is not None:
        meta = {"captions": json.dumps(encoded.captions_list), "stats": json.dumps(encoded.stats), "data": str(data),
                "codec": json.dumps(codec.config()), "image_size": str(image_size),
                "probe": codec_fingerprint(codec, image_size)}
        atomic_write_bytes(path, save({"latents": encoded.tensor.contiguous()}, metadata=meta))
        encoded.cache_path = path
        drop_superseded(path, meta)
    return encoded


def shard_folder(data: str, image_size: int, codec, cache_dir: str) -> Path | None:
    """Where the latent shards of (data, size, codec) live in the latent cache; None when caching is off."""
    path = cache_file(data, image_size, codec, cache_dir)
    return None if path is None else path.with_name(path.stem + "-shards")


def open_latent_store(config, codec, progress: bool = True, say=print) -> LatentStore:
    """The run's records: a latent-shard folder given as `data`, else the in-memory cache for a small
    dataset, else latent shards encoded into the latent cache. `say` is told which and why."""
    from ..data import open_caption_dataset
    from ..data.encode_shards import encode_to_shards
    from ..data.latent_shards import LatentShards, is_shard_folder

    data, size = config.data, config.image_size
    if wants_chat_data(config):
        return open_chat_store(config, codec, say)
    if wants_edit_data(config):
        return open_edit_store(config, codec, say)
    if is_shard_folder(data):
        store = LatentShards(data)
        store.check_matches(codec.config(), codec_fingerprint(codec, size), size)
        say(f"data: {data} is a latent-shard folder; streaming it")
        return store
    cached, shards = cache_file(data, size, codec, config.latent_cache), shard_folder(data, size, codec, config.latent_cache)
    if cached is not None and cached.is_file():
        say("data: in memory (latents cached by an earlier run)")
        return read_cache(cached)
    if shards is not None and is_shard_folder(shards):
        say(f"data: streaming latent shards {shards} (encoded by an earlier run)")
        return LatentShards(shards)
    source = open_caption_dataset(data, size)
    channels, height, width = codec.latent_shape(size)
    limit = config.memory_cache_limit_mb
    if hasattr(source, "__len__"):
        megabytes = len(source) * channels * height * width * 4 / 2**20
        small, why = megabytes <= limit, f"{len(source)} records, {megabytes:.0f} MiB of fp32 latents vs memory_cache_limit_mb {limit:g}"
    else:
        small, why = False, "a streamed source, size unknown before reading it"
    if small or shards is None:
        reason = why if small else why + "; but latent_cache is 'none', so no shard folder"
        say(f"data: encoding into memory ({reason})")
        return load_or_encode(data, size, codec, config.latent_cache, progress)
    say(f"data: encoding to latent shards {shards} and streaming them ({why})")
    return encode_to_shards(data, shards, codec, size, workers=config.data_workers, progress=progress)


def probe_records(data: str, image_size: int, codec, n: int) -> tuple[torch.Tensor, list[str], str]:
    """Up to n (latents, captions) for the conditioning probes, and where they came from.

    The held-out split (DATA/test, as `lmfusion data shapes` writes it) when there is one, so the
    probes measure what the model does on images it never trained on; else the first training
    records.
    """
    from ..data import read_records
    from ..data.latent_shards import LatentShards, is_shard_folder

    if is_shard_folder(data):  # no images to encode: the shards' first records, already encoded
        store = LatentShards(data)
        shown = range(min(n, len(store)))
        return store.latents(shown), [store.caption(i) for i in shown], "first records of the latent shards"
    test = Path(data) / "test"
    source = test if (test / "metadata.jsonl").is_file() else Path(data)
    records = read_records(str(source), image_size, n)
    with torch.no_grad():
        latents = codec.encode(torch.stack([r.image for r in records])).float().cpu()
    return latents, [r.caption for r in records], "held-out test split" if source == test else "first training records"


def drop_superseded(path: Path, meta: dict[str, str]) -> list[Path]:
    """Delete the cache files that `path` replaces: same data path, size and codec, older data.

    Without this every edit of a dataset would leave a full copy of its old latents behind.
    Files of another codec or size stay: a later run may still use them.
    """
    from safetensors import safe_open

    same = ("data", "codec", "image_size", "probe")
    removed = []
    for other in path.parent.glob(f"{path.stem.rsplit('-', 1)[0]}-*.safetensors"):
        if other == path:
            continue
        try:
            with safe_open(str(other), framework="pt") as handle:
                old = handle.metadata() or {}
        except Exception:  # not a readable cache file: not ours to delete
            continue
        if all(old.get(key) == meta[key] for key in same):
            other.unlink(missing_ok=True)
            removed.append(other)
    return removed


def read_cache(path: Path) -> CaptionLatents:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    latents = load_file(str(path))["latents"]
    return CaptionLatents(latents, json.loads(meta["captions"]), json.loads(meta["stats"]), path, from_cache=True)


# --------------------------------------------------------------------------- example plans
@dataclass(frozen=True)
class Plan:
    record: int
    kind: str  # "caption_first" | "image_first" | "text" | "edit" | "chat" (record = a chat row)
    drop_caption: bool = False  # for "edit": the instruction is dropped
    text_index: int = 0  # into the text-only documents, when kind == "text"
    drop_source: bool = False  # "edit" only: the source image is dropped
    clean_image: bool = False  # "chat" only: a one-image conversation's image enters clean, with no loss


class ExamplePlanner:
    """Decides, for global sample position p, which record to use and how to lay it out.

    Records are visited in a fresh permutation each epoch; the layout draws come from a
    generator seeded by (seed, p), so any position can be planned without replaying the past.
    """

    def __init__(self, n_records: int, seed: int, image_first_ratio: float = 0.2, caption_dropout: float = 0.1,
                 text_only_ratio: float = 0.0, n_texts: int = 0, edit: bool = False, edit_dropout: float = 0.05,
                 chat: bool = False, n_edits: int = 0, chat_edit_ratio: float = 0.0,
                 chat_clean_stop_ratio: float = 0.0):
        if n_records <= 0:
            raise ValueError("no usable training records")
        self.n, self.seed, self.n_texts = n_records, seed, n_texts
        # chat: every example is a conversation, except a chat_edit_ratio share of edits drawn from
        # the n_edits mixed-in triples (the conversations keep their epoch permutation)
        self.chat, self.n_edits, self.chat_edit_ratio = chat, n_edits, chat_edit_ratio
        # the sampler appends a finished image clean, so the stop after one image must also be learnt
        # after a clean one: in a one-image example the image is otherwise the (noised) target
        self.chat_clean_stop_ratio = chat_clean_stop_ratio
        self.edit, self.edit_dropout = edit, edit_dropout
        self.image_first_ratio, self.caption_dropout, self.text_only_ratio = image_first_ratio, caption_dropout, text_only_ratio

    @lru_cache(maxsize=4)
    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, _PLAN_SALT, epoch]).permutation(self.n)

    def plan(self, position: int) -> Plan:
        epoch, offset = divmod(position, self.n)
        record = int(self.order(epoch)[offset])
        u = np.random.default_rng([self.seed, _PLAN_SALT, 1 << 40, position]).random(4)
        if self.chat:
            if u[0] >= self.chat_edit_ratio or not self.n_edits:
                return Plan(record, "chat", clean_image=bool(u[2] < self.chat_clean_stop_ratio))
            case = int(u[1] // self.edit_dropout) if self.edit_dropout > 0 else 3
            return Plan(min(int(u[3] * self.n_edits), self.n_edits - 1), "edit", drop_caption=case in (0, 2),
                        drop_source=case in (1, 2))
        if u[0] < self.text_only_ratio:
            return Plan(record, "text", text_index=int(u[3] * self.n_texts) if self.n_texts else record)
        if self.edit:  # InstructPix2Pix's dropout: instruction, source, or both, edit_dropout each
            case = int(u[1] // self.edit_dropout) if self.edit_dropout > 0 else 3
            return Plan(record, "edit", drop_caption=case in (0, 2), drop_source=case in (1, 2))
        if u[1] < self.image_first_ratio:
            return Plan(record, "image_first")
        return Plan(record, "caption_first", drop_caption=bool(u[2] < self.caption_dropout))


def read_text_documents(path: str) -> list[str]:
    if not path:
        return []
    if not Path(path).is_file():
        raise FileNotFoundError(f"text_data file not found: {path}")
    docs = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not docs:
        raise ValueError(f"text_data file {path} holds no text")
    return docs


# --------------------------------------------------------------------------- batches
class BatchSource:
    """Builds the micro-batch for any range of global sample positions."""

    def __init__(self, data: LatentStore, builder: SequenceBuilder, planner: ExamplePlanner, texts: list[str] | None = None,
                 pack_length: int = 0):
        self.data, self.builder, self.planner = data, builder, planner
        self.texts = texts or []
        self.pack_length = pack_length  # > 0: packed rows (SequenceBuilder.pack), else one padded row per example

    def example(self, plan: Plan) -> tuple[Example, list[tuple[str, int]]]:
        """The laid-out example and its images in order, as (role, index): role "source" or
        "record" (by record), or "chat" (by row of the chat store's images)."""
        if plan.kind == "chat":
            row = self.data.rows[plan.record]
            user_turn = user_turn_ids(self.builder.tokenizer, row["user"])
            images = self.data.image_rows[plan.record]
            example = self.builder.chat(user_turn, row.get("lead_in") or "", len(images), row.get("reply") or "",
                                        bool(row.get("reply_stopped", True)), clean_single=plan.clean_image)
            return example, [("chat", i) for i in images]
        caption = self.data.caption(plan.record)
        if plan.kind == "text":
            return self.builder.text_only(self.texts[plan.text_index] if self.texts else caption), []
        if plan.kind == "edit":
            example = self.builder.edit(caption, drop_source=plan.drop_source, drop_instruction=plan.drop_caption)
            images = [] if plan.drop_source else [("source", plan.record)]
            return example, images + [("record", plan.record)]
        if plan.kind == "image_first":
            return self.builder.image_then_text(caption), [("record", plan.record)]
        return self.builder.text_then_image("" if plan.drop_caption else caption), [("record", plan.record)]

    def batch(self, positions) -> tuple[MultimodalBatch, list[Plan]]:
        plans = [self.planner.plan(p) for p in positions]
        examples, images = [], []
        for plan in plans:
            example, used = self.example(plan)
            examples.append(example)
            images.extend(used)
        latents = self.latents(images) if images else None
        if self.pack_length:
            return self.builder.pack(examples, latents, self.pack_length), plans
        return self.builder.collate(examples, latents), plans

    def latents(self, images: list[tuple[str, int]]) -> torch.Tensor:
        """The images' latents in reading order: one read per role, then put back in order."""
        readers = {"record": self.data.latents, "source": getattr(self.data, "source_latents", None),
                   "chat": getattr(self.data, "chat_latents", None)}
        roles = [role for role in readers if any(r == role for r, _ in images)]
        if roles == ["record"]:
            return self.data.latents([i for _, i in images])
        parts, order = [], torch.empty(len(images), dtype=torch.long)
        done = 0
        for role in roles:
            where = [k for k, (r, _) in enumerate(images) if r == role]
            parts.append(readers[role]([images[k][1] for k in where]))
            order[torch.tensor(where)] = torch.arange(len(where)) + done
            done += len(where)
        return torch.cat(parts)[order]


def build_batch_source(data: LatentStore, model, config) -> BatchSource:
    """Wire a dataset to the model's tokenizer and the config's mixing ratios."""
    builder = SequenceBuilder(model.tokenizer, model.boi_token_id, model.eoi_token_id, model.config.tokens_per_image,
                              config.max_text_tokens, model.config.num_train_timesteps)
    texts = read_text_documents(config.text_data)
    planner = ExamplePlanner(len(data), config.seed, config.image_first_ratio, config.caption_dropout,
                             config.text_only_ratio, len(texts), edit=getattr(data, "is_edit", False),
                             edit_dropout=config.edit_dropout, chat=getattr(data, "is_chat", False),
                             n_edits=len(data.edits) if getattr(data, "edits", None) is not None else 0,
                             chat_edit_ratio=config.chat_edit_ratio, chat_clean_stop_ratio=config.chat_clean_stop_ratio)
    return BatchSource(data, builder, planner, texts, config.pack_length)
