"""Encode an image-caption source into latent shards (lmfusion.data.latent_shards), resumably.

Images are decoded in DataLoader worker processes while the main process runs the codec on
batches. Each finished shard is written atomically and records the encode's plan (source
fingerprint, image size, codec, shard size, dtype, flip) in its metadata, so a rerun after an
interrupt keeps the shards of the same plan and encodes only the missing ones, and refuses a
folder left by a different encode instead of mixing the two.

Map-style sources (image folders, HF datasets on disk) give shard k the source rows
[k * shard_size, (k + 1) * shard_size), minus the rows that fail to load, so any missing shard can
be redone alone. Streamed sources (WebDataset) have no row numbers: shard k holds the
k-th shard_size records of the stream, and a resume reads (and skips) the finished part again.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .fingerprints import codec_fingerprint, dataset_fingerprint
from .formats import NoUsableDataError, open_caption_dataset
from .images import BadImageError, load_rgb_image
from .latent_shards import (DTYPES, FORMAT_VERSION, LatentShards, is_shard_folder, merge_stats, shard_metadata,
                            shard_name, shard_records, stats_summary, write_index, write_shard)


class _Rows(Dataset):
    """The given rows of a map-style caption dataset; a row that fails to load comes back as its reason.

    The readers' own __getitem__ replaces a bad image by the next good one (a map-style epoch
    cannot shrink); an encode must skip it instead, and count it in the main process.
    """

    def __init__(self, dataset, rows: list[int]):
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        try:
            record = self.dataset._record(row, load_rgb_image(self.dataset._source(row), self.dataset.size))
        except BadImageError as error:
            return row, None, None, error.reason
        return row, record.image, record.caption, None


class _Stream(IterableDataset):
    """A streamed caption dataset's records, then each worker's skip counts (they live in its copy)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        for record in self.dataset:
            yield "record", record.image, record.caption
        stats = self.dataset.stats
        yield "stats", {"seen": stats.seen, "ok": stats.ok, "skipped": dict(stats.skipped)}, None


def _identity(batch):
    return batch


def encode_to_shards(data: str, out, codec, image_size: int, *, shard_size: int = 10000, dtype: str = "fp16",
                     workers: int = 2, flip: bool = False, device: str = "cpu", batch_size: int = 64,
                     progress: bool = True) -> LatentShards:
    """Encode `data` into latent shards at `out` (resuming a previous run of the same plan)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1 or workers < 0:
        raise ValueError(f"need shard_size >= 1, batch_size >= 1 and workers >= 0, got {shard_size}, {batch_size}, {workers}")
    out = Path(out)
    codec = codec.to(device).eval()
    try:
        dataset = open_caption_dataset(data, image_size)
    except NoUsableDataError as error:
        raise ValueError(f"no usable training data: {error}") from None
    streamed = not hasattr(dataset, "__len__")
    plan = {"format_version": FORMAT_VERSION, "source": dataset_fingerprint(data), "image_size": image_size,
            "codec": codec.config(), "codec_fingerprint": codec_fingerprint(codec, image_size),
            "shard_size": shard_size, "dtype": dtype, "flip": flip}
    if streamed:  # with workers the stream's order depends on how many there are
        plan["workers"] = workers
    plan = json.loads(json.dumps(plan))  # as it reads back from a shard (tuples become lists)
    done = _finished_shards(out, plan)
    if is_shard_folder(out) and not done:
        raise ValueError(f"{out} already holds latent shards of another encode; choose another --out")
    encoder = _Encoder(codec, out, dtype, flip, device, plan)
    if streamed:
        stats, counts = _encode_stream(dataset, encoder, done, shard_size, workers, batch_size, progress)
    else:
        stats, counts = _encode_rows(dataset, encoder, done, shard_size, workers, batch_size, progress)
    if sum(counts) == 0:
        raise ValueError(f"no usable training data in {data}: {stats_summary(stats)}")
    write_index(out, counts=counts, codec=plan["codec"], codec_fingerprint=plan["codec_fingerprint"],
                image_size=image_size, latent_shape=codec.latent_shape(image_size), dtype=dtype, flipped=flip,
                stats=stats, extra={"source": str(data), "shard_size": shard_size})
    return LatentShards(out)


def _finished_shards(out: Path, plan: dict) -> dict[int, dict]:
    """Shard number -> metadata of the shards already written under the same plan."""
    done = {}
    for path in sorted(out.glob("shard-*.safetensors")):
        meta = shard_metadata(path)
        if meta.get("plan") != plan:
            differs = sorted(k for k in plan if k not in ("source",) and meta.get("plan", {}).get(k) != plan[k])
            what = ", ".join(differs) or "source data"
            raise ValueError(f"{path} was written by another encode (differs in {what}); use another --out or delete it")
        done[int(path.stem.split("-")[1])] = meta
    return done


class _Encoder:
    """Runs the codec on a batch of images and writes a shard's records."""

    def __init__(self, codec, out: Path, dtype: str, flip: bool, device: str, plan: dict):
        self.codec, self.out, self.dtype, self.flip, self.device, self.plan = codec, out, dtype, flip, device, plan

    def encode(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        pixels = torch.stack(images).to(self.device)
        with torch.no_grad():
            latents = self.codec.encode(pixels).float().cpu()
            flipped = self.codec.encode(pixels.flip(-1)).float().cpu() if self.flip else None
        return latents, flipped

    def write(self, number: int, latents: list, flipped: list, captions: list[str], extra: dict) -> None:
        shape = (0, *self.codec.latent_shape(self.plan["image_size"]))
        stack = (lambda parts: torch.cat(parts) if parts else torch.empty(shape))
        write_shard(self.out, number, stack(latents), captions, dtype=self.dtype,
                    flipped=stack(flipped) if self.flip else None, metadata={"plan": self.plan, **extra})


def _encode_rows(dataset, encoder: _Encoder, done: dict, shard_size: int, workers: int, batch_size: int,
                 progress: bool) -> tuple[dict, list[int]]:
    from tqdm.auto import tqdm

    n_shards = -(-len(dataset) // shard_size)
    todo = [k for k in range(n_shards) if k not in done]
    rows = [r for k in todo for r in range(k * shard_size, min((k + 1) * shard_size, len(dataset)))]
    loader = DataLoader(_Rows(dataset, rows), batch_size=batch_size, num_workers=workers, collate_fn=_identity)
    counts = {k: shard_records(encoder.out / shard_name(k)) for k in done}
    failed = Counter()
    for meta in done.values():
        failed.update(meta.get("load_skipped", {}))
    current, latents, flipped, captions, bad = None, [], [], [], Counter()

    def flush():
        encoder.write(current, latents, flipped, captions, {"load_skipped": dict(bad)})
        counts[current] = len(captions)
        failed.update(bad)

    with tqdm(total=len(rows), desc="encoding latent shards", unit="img", disable=not progress) as bar:
        for batch in loader:
            # A batch may straddle two shards: split it where the shard number changes.
            for shard in sorted({row // shard_size for row, *_ in batch}):
                if current is not None and shard != current:
                    flush()
                    latents, flipped, captions, bad = [], [], [], Counter()
                current = shard
                part = [item for item in batch if item[0] // shard_size == shard]
                good = [item for item in part if item[3] is None]
                bad.update(item[3] for item in part if item[3] is not None)
                if good:
                    lat, flp = encoder.encode([item[1] for item in good])
                    latents.append(lat)
                    if flp is not None:
                        flipped.append(flp)
                    captions += [item[2] for item in good]
            bar.update(len(batch))
        if current is not None:
            flush()
    scan = dataset.stats  # skips found while scanning the source, in this process
    stats = {"source": scan.source, "seen": scan.seen, "ok": scan.ok - sum(failed.values()),
             "skipped": dict(Counter(dict(scan.skipped)) + failed)}
    return stats, [counts[k] for k in range(n_shards)]


def _encode_stream(dataset, encoder: _Encoder, done: dict, shard_size: int, workers: int, batch_size: int,
                   progress: bool) -> tuple[dict, list[int]]:
    from tqdm.auto import tqdm

    finished = 0
    while finished in done:
        finished += 1
    workers = min(workers, len(getattr(dataset, "urls", [])) or 1)
    loader = DataLoader(_Stream(dataset), batch_size=None, num_workers=workers, collate_fn=_identity)
    counts, parts, seen = [], [], 0
    images, captions, latents, flipped = [], [], [], []

    def encode_pending():
        if images:
            lat, flp = encoder.encode(images)
            latents.append(lat)
            if flp is not None:
                flipped.append(flp)
            images.clear()

    with tqdm(desc="encoding latent shards", unit="img", disable=not progress) as bar:
        for kind, value, caption in loader:
            if kind == "stats":
                parts.append(value)
                continue
            seen += 1
            bar.update(1)
            if seen <= finished * shard_size:  # a finished shard's record: read again, not encoded
                continue
            images.append(value)
            captions.append(caption)
            if len(images) == batch_size:
                encode_pending()
            if len(captions) == shard_size:
                encode_pending()
                encoder.write(len(counts) + finished, latents, flipped, captions, {})
                counts.append(len(captions))
                captions, latents, flipped = [], [], []
        encode_pending()
        if captions:
            encoder.write(len(counts) + finished, latents, flipped, captions, {})
            counts.append(len(captions))
    counts = [shard_size] * finished + counts
    if seen < finished * shard_size:
        raise ValueError(f"the stream now holds {seen} records, fewer than its {finished} finished shards; "
                         "it changed since they were written")
    return merge_stats(str(dataset.stats.source), parts), counts


__all__ = ["encode_to_shards", "shard_name"]
