"""Chat conversations as training data (`task: chat`): `lmfusion data shapes-chat` folders.

Every image of the set is encoded once and held in memory (the sets are small, as editing sets
are), cached in the latent cache under the same (data, size, codec) key. A run may mix in an
editing set (`chat_edit_data`, a share `chat_edit_ratio` of the examples): the `instruct` preset
trains editing and chat together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from ..data.fingerprints import codec_fingerprint
from ..data.images import BadImageError, load_rgb_image
from ..data.shapes_chat import find_chat_file, read_chat_rows
from ..utils import atomic_write_bytes
from .edit_data import EditLatents, open_edit_store

# What a training example needs of a row (the rest, object records, is for evaluation).
_ROW_KEYS = ("kind", "user", "lead_in", "reply", "reply_stopped")


@dataclass
class ChatLatents:
    """Chat rows (their text fields) and the clean latents of their images [N, C, h, w].

    `image_rows[r]` lists the latents rows of row r's images, in reading order. `edits`, when set,
    is an editing set mixed into the run; `latents` / `source_latents` / `caption` then read it
    (edit plans number its triples), so the editing code path is the one edit runs use.
    """

    rows: list[dict]
    images: torch.Tensor
    image_rows: list[list[int]]
    stats: dict
    edits: EditLatents | None = None
    cache_path: Path | None = None
    from_cache: bool = False
    is_chat = True
    is_edit = False

    def __len__(self) -> int:
        return len(self.rows)

    def _mixed_edits(self) -> EditLatents:
        if self.edits is None:
            raise ValueError("this chat set has no editing triples mixed in (chat_edit_data / chat_edit_ratio); "
                             "chat rows are read by row, through chat_latents")
        return self.edits

    def caption(self, record: int) -> str:
        return self._mixed_edits().caption(record)

    def latents(self, indices) -> torch.Tensor:
        return self._mixed_edits().latents(indices)

    def source_latents(self, indices) -> torch.Tensor:
        return self._mixed_edits().source_latents(indices)

    def chat_latents(self, indices) -> torch.Tensor:
        """Latents by row of `images` (BatchSource asks with the numbers of `image_rows`)."""
        return self.images[torch.as_tensor(list(indices), dtype=torch.long)].float()

    def stats_summary(self) -> str:
        skipped = ", ".join(f"{k}: {v}" for k, v in self.stats["skipped"].items()) or "none"
        return f"{self.stats['ok']} of {self.stats['seen']} chat rows usable (skipped: {skipped})"

    def description(self) -> str:
        kind = f"cached latents {self.cache_path}" if self.from_cache else "freshly encoded, in memory"
        mixed = f", mixed with {len(self.edits)} editing triples" if self.edits is not None else ""
        return f"chat conversations, {kind}{mixed}"


def wants_chat_data(config) -> bool:
    """`task: chat`, or `auto` and a chat.jsonl layout at `data`."""
    return config.task == "chat" or (config.task == "auto" and find_chat_file(config.data) is not None)


def encode_chat(data: str, image_size: int, codec, batch: int = 64, progress: bool = True) -> ChatLatents:
    """Read DATA/train/chat.jsonl (or DATA/chat.jsonl) and encode its images; a row whose image
    cannot be read is skipped and counted, not fatal. `progress`: a bar over the images."""
    path = find_chat_file(data)
    if path is None:
        raise FileNotFoundError(f"no chat.jsonl in {data} or {data}/train (make one with `lmfusion data shapes-chat`)")
    rows, pixels, image_rows, skipped = [], [], [], {}
    for row in read_chat_rows(path):
        try:
            loaded = [load_rgb_image(path.parent / name, image_size) for name in row.get("images", [])]
        except (BadImageError, FileNotFoundError, OSError):
            skipped["unreadable image"] = skipped.get("unreadable image", 0) + 1
            continue
        image_rows.append(list(range(len(pixels), len(pixels) + len(loaded))))
        pixels.extend(loaded)
        rows.append({k: row.get(k) for k in _ROW_KEYS})
    if not rows:
        raise ValueError(f"no usable chat rows in {path}: {skipped}")
    chunks = []
    with torch.no_grad():
        with tqdm(total=len(pixels), desc="encoding chat images", unit="img", disable=not progress) as bar:
            for start in range(0, len(pixels), batch):
                chunks.append(codec.encode(torch.stack(pixels[start : start + batch])).float().cpu())
                bar.update(min(batch, len(pixels) - start))
    channels, height, width = codec.latent_shape(image_size)
    images = torch.cat(chunks) if chunks else torch.zeros(0, channels, height, width)
    stats = {"source": str(path), "seen": len(rows) + sum(skipped.values()), "ok": len(rows), "skipped": skipped}
    return ChatLatents(rows, images, image_rows, stats)


def open_chat_store(config, codec, say=print) -> ChatLatents:
    """The run's conversations from the latent cache, encoding and caching them on a miss; plus
    the editing set of `chat_edit_data` when the run mixes one in."""
    from .data import cache_file, drop_superseded  # the caption cache's naming and clean-up

    path = cache_file(config.data, config.image_size, codec, config.latent_cache)
    if path is not None:  # "<data>-chat-<key>", so drop_superseded finds only this file's older versions
        stem, key = path.stem.rsplit("-", 1)
        path = path.with_name(f"{stem}-chat-{key}.safetensors")
    if path is not None and path.is_file():
        say("data: chat conversations in memory (latents cached by an earlier run)")
        store = read_chat_cache(path)
    else:
        say("data: encoding chat conversations into memory")
        store = encode_chat(config.data, config.image_size, codec, progress=config.progress)
        if path is not None:
            meta = {"rows": json.dumps(store.rows), "image_rows": json.dumps(store.image_rows),
                    "stats": json.dumps(store.stats), "data": str(config.data), "codec": json.dumps(codec.config()),
                    "image_size": str(config.image_size), "probe": codec_fingerprint(codec, config.image_size),
                    "kind": "chat"}
            atomic_write_bytes(path, save({"images": store.images.contiguous()}, metadata=meta))
            store.cache_path = path
            drop_superseded(path, meta)
    if config.chat_edit_ratio > 0:
        edit_config = config.replace(data=config.chat_edit_data, task="edit", chat_edit_data="", chat_edit_ratio=0.0)
        store.edits = open_edit_store(edit_config, codec, say)
    return store


def read_chat_cache(path: Path) -> ChatLatents:
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    images = load_file(str(path))["images"]
    return ChatLatents(json.loads(meta["rows"]), images, json.loads(meta["image_rows"]), json.loads(meta["stats"]),
                       cache_path=path, from_cache=True)
