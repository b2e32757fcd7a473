"""Readers for image-caption datasets on disk, plus an atomic ``imagefolder`` writer.

Every reader yields :class:`CaptionRecord` ``(image [3,size,size] in [0,1], caption, meta)``
and keeps a :class:`DataStats` in ``.stats``: real-world caption data always has some
broken files and blank captions, and training should skip them, say how many, and
refuse to start only when nothing usable is left (:class:`NoUsableDataError`).
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator, NamedTuple, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..utils import publish_directory, staging_directory
from .images import BadImageError, load_rgb_image, to_pil, verify_image

log = logging.getLogger(__name__)

TEXT_FIELDS = ("text", "caption")
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
WDS_TEXT_KEYS = ("txt", "caption")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class NoUsableDataError(RuntimeError):
    """A dataset in which every record was skipped: training on it would be meaningless."""


class CaptionRecord(NamedTuple):
    image: torch.Tensor
    caption: str
    meta: dict[str, Any]


@dataclass
class DataStats:
    """How many records a reader saw, kept, and skipped (by reason).

    Shard-level problems (an unreadable tar) are counted in ``skipped`` without adding
    to ``seen``, since the records they contained were never seen.
    """

    source: str = ""
    seen: int = 0
    ok: int = 0
    skipped: Counter = field(default_factory=Counter)

    def accept(self) -> None:
        self.seen += 1
        self.ok += 1

    def skip(self, reason: str) -> None:
        self.seen += 1
        self.skipped[reason] += 1

    def note(self, reason: str) -> None:
        """Count a problem that is not tied to one record (e.g. a broken shard)."""
        self.skipped[reason] += 1

    def demote(self, reason: str) -> None:
        """A record accepted at scan time turned out to be unreadable when loaded."""
        self.ok -= 1
        self.skipped[reason] += 1

    def reset(self) -> None:
        self.seen, self.ok = 0, 0
        self.skipped.clear()

    def summary(self) -> str:
        reasons = ", ".join(f"{name}={count}" for name, count in sorted(self.skipped.items()))
        text = f"{self.source}: seen={self.seen} ok={self.ok} skipped={sum(self.skipped.values())}"
        return text + (f" ({reasons})" if reasons else "")


def _caption_or_reason(value: Any) -> tuple[str | None, str | None]:
    """``(stripped caption, None)``, or ``(None, skip reason)`` when absent or blank."""
    if not isinstance(value, str):
        return None, "missing_caption"
    caption = value.strip()
    return (caption, None) if caption else (None, "empty_caption")


def _raise_if_empty(stats: DataStats, what: str) -> None:
    if stats.ok <= 0:
        raise NoUsableDataError(f"no usable image-caption records in {what}: {stats.summary()}")


def collate_records(batch: Sequence[CaptionRecord]) -> tuple[torch.Tensor, list[str], list[dict]]:
    """DataLoader collate: metas vary in shape (e.g. object lists), so keep them as a list."""
    images = torch.stack([record[0] for record in batch])
    return images, [record[1] for record in batch], [record[2] for record in batch]


# --------------------------------------------------------------------------- imagefolder


def find_metadata(root: str | os.PathLike) -> Path | None:
    """``root/metadata.jsonl``, else ``root/train/metadata.jsonl`` (an HF split layout)."""
    for candidate in (Path(root) / "metadata.jsonl", Path(root) / "train" / "metadata.jsonl"):
        if candidate.is_file():
            return candidate
    return None


class _MapStyleCaptions(Dataset):
    """Shared ``__getitem__`` for readers that pre-scan their records.

    A map-style dataset cannot shrink mid-epoch, so an image that fails at load time
    (despite the scan) is counted once, remembered, and replaced by the next good item.
    In DataLoader workers the counts land in the worker's copy of ``stats``.
    """

    def __init__(self, size: int, source: str) -> None:
        self.size = size
        self.stats = DataStats(source)
        self._bad: set[int] = set()

    def _source(self, index: int) -> Any:
        raise NotImplementedError

    def _record(self, index: int, image: torch.Tensor) -> CaptionRecord:
        raise NotImplementedError

    def __getitem__(self, index: int) -> CaptionRecord:
        count = len(self)
        for offset in range(count):
            current = (index + offset) % count
            if current in self._bad:
                continue
            try:
                return self._record(current, load_rgb_image(self._source(current), self.size))
            except BadImageError as error:
                self._bad.add(current)
                self.stats.demote(error.reason)
                log.warning("skipping %s", error)
        raise NoUsableDataError(f"every image failed to load: {self.stats.summary()}")


class ImageFolderCaptions(_MapStyleCaptions):
    """HF ``imagefolder`` layout: images plus ``metadata.jsonl`` rows ``{file_name, text}``.

    Metadata is scanned once at construction; with ``validate=True`` each image is also
    checked with PIL ``verify()`` so broken files are skipped before training starts.
    """

    def __init__(self, root: str | os.PathLike, size: int, *, validate: bool = True,
                 text_fields: Sequence[str] = TEXT_FIELDS) -> None:
        super().__init__(size, str(root))
        self.root = Path(root)
        metadata = find_metadata(self.root)
        if metadata is None:
            raise FileNotFoundError(f"no metadata.jsonl in {self.root} or {self.root / 'train'}")
        self.metadata_path = metadata
        self._items: list[tuple[Path, str, dict]] = []
        for row in self._read_rows(metadata):
            self._scan_row(row, metadata.parent, validate, text_fields)
        _raise_if_empty(self.stats, str(metadata))

    def _read_rows(self, metadata: Path) -> Iterator[dict]:
        with open(metadata, encoding="utf-8") as stream:
            for line in stream:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if isinstance(row, dict) and isinstance(row.get("file_name"), str):
                    yield row
                else:
                    self.stats.skip("bad_metadata")

    def _scan_row(self, row: dict, folder: Path, validate: bool, text_fields: Sequence[str]) -> None:
        value = next((row[name] for name in text_fields if name in row), None)
        caption, reason = _caption_or_reason(value)
        path = folder / row["file_name"]
        if reason is None and not path.is_file():
            reason = "missing_file"
        if reason is None and validate:
            try:
                verify_image(path)
            except BadImageError as error:
                reason = error.reason
        if reason is not None:
            self.stats.skip(reason)
            return
        self.stats.accept()
        self._items.append((path, caption, {**row, "path": str(path)}))

    def __len__(self) -> int:
        return len(self._items)

    def _source(self, index: int) -> Path:
        return self._items[index][0]

    def _record(self, index: int, image: torch.Tensor) -> CaptionRecord:
        _, caption, meta = self._items[index]
        return CaptionRecord(image, caption, dict(meta))


# --------------------------------------------------------------------------- HF save_to_disk


def _hf_image_source(value: Any) -> Any:
    """Raw HF image cell (``{bytes, path}``, bytes, path or PIL) to a load_rgb_image source."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    return value


class HFDiskCaptions(_MapStyleCaptions):
    """A ``datasets`` dataset written with ``save_to_disk`` (a DatasetDict uses ``split``).

    The image column is read undecoded (``Image(decode=False)``) so that one corrupt
    image is a counted skip here rather than an exception deep inside ``datasets``.
    """

    def __init__(self, path: str | os.PathLike, size: int, image_column: str = "image",
                 text_column: str = "text", *, split: str | None = None,
                 validate: bool = True) -> None:
        import datasets  # slow to import; only needed for this format

        super().__init__(size, str(path))
        self.path = Path(path)
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            split = split or ("train" if "train" in loaded else next(iter(loaded)))
            loaded = loaded[split]
        columns = loaded.column_names
        if text_column not in columns and text_column == "text" and "caption" in columns:
            text_column = "caption"
        for column in (image_column, text_column):
            if column not in columns:
                raise ValueError(f"{path}: no column {column!r}; columns are {columns}")
        if isinstance(loaded.features[image_column], datasets.Image):
            loaded = loaded.cast_column(image_column, datasets.Image(decode=False))
        self._data, self.image_column = loaded, image_column
        self._rows: list[tuple[int, str]] = []
        for index, value in enumerate(list(loaded[text_column])):
            self._scan_row(index, value, validate)
        _raise_if_empty(self.stats, str(path))

    def _scan_row(self, index: int, value: Any, validate: bool) -> None:
        caption, reason = _caption_or_reason(value)
        if reason is None:
            source = self._row_source(index)
            if source is None:
                reason = "missing_image"
            elif validate and not isinstance(source, Image.Image):
                try:
                    verify_image(source)
                except BadImageError as error:
                    reason = error.reason
        if reason is not None:
            self.stats.skip(reason)
            return
        self.stats.accept()
        self._rows.append((index, caption))

    def _row_source(self, row: int) -> Any:
        return _hf_image_source(self._data[row][self.image_column])

    def _source(self, index: int) -> Any:
        return self._row_source(self._rows[index][0])

    def __len__(self) -> int:
        return len(self._rows)

    def _record(self, index: int, image: torch.Tensor) -> CaptionRecord:
        row, caption = self._rows[index]
        return CaptionRecord(image, caption, {"row": row, "path": str(self.path)})


# --------------------------------------------------------------------------- WebDataset


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard list from a path, glob, brace pattern (``a-{000..009}.tar``) or ``::``-list."""
    if not isinstance(spec, (str, os.PathLike)):
        return [url for item in spec for url in expand_shards(item)]
    import braceexpand  # a webdataset dependency

    urls: list[str] = []
    for part in os.fspath(spec).split("::"):
        for url in braceexpand.braceexpand(part):
            has_glob = not _is_remote(url) and any(char in url for char in "*?[")
            urls.extend(sorted(glob.glob(url)) if has_glob else [url])
    return urls


class WebDatasetCaptions(IterableDataset):
    """WebDataset tar shards: ``<key>.{jpg,png,...}`` + ``<key>.{txt,caption,json}``.

    Only webdataset's tar-parsing stages are used (no decoders, no caching, no
    network for local paths); shards are split across DataLoader workers.
    ``stats`` describe the most recent pass (reset at the start of each iteration).
    """

    def __init__(self, urls_or_glob: str | os.PathLike | Sequence[str | os.PathLike],
                 size: int) -> None:
        self.spec, self.size = urls_or_glob, size
        self.urls = expand_shards(urls_or_glob)
        self.stats = DataStats(str(urls_or_glob))
        local = [url for url in self.urls if not _is_remote(url)]
        if not self.urls or (local and len(local) == len(self.urls)
                             and not any(os.path.isfile(url) for url in local)):
            raise FileNotFoundError(f"no WebDataset shards found for {urls_or_glob!r}")

    def __iter__(self) -> Iterator[CaptionRecord]:
        from webdataset.shardlists import split_by_worker

        self.stats.reset()
        my_urls = list(split_by_worker(iter(self.urls)))
        for url in my_urls:
            for sample in self._shard_samples(url):
                record = self._decode(sample)
                if record is not None:
                    yield record
        if my_urls and get_worker_info() is None:
            _raise_if_empty(self.stats, str(self.spec))
        elif my_urls and self.stats.ok == 0:  # other workers may still have good shards
            log.warning("no usable records in this worker's shards: %s", self.stats.summary())

    def _on_error(self, error: Exception) -> bool:
        """webdataset handler: count, log and keep going."""
        reason = "missing_shard" if isinstance(error, FileNotFoundError) else "bad_shard"
        self.stats.note(reason)
        log.warning("webdataset %s: %s", reason, error)
        return True

    def _shard_samples(self, url: str) -> Iterator[dict]:
        from webdataset.gopen import gopen
        from webdataset.tariterators import group_by_keys, tar_file_expander

        try:
            stream = gopen(url) if _is_remote(url) else open(url, "rb")
        except OSError as error:
            self._on_error(error)
            return
        with stream:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=self._on_error)
            yield from group_by_keys(files, handler=self._on_error)

    def _decode(self, sample: dict) -> CaptionRecord | None:
        meta: dict[str, Any] = {"key": sample.get("__key__"), "url": sample.get("__url__")}
        text = next((sample[key] for key in WDS_TEXT_KEYS if key in sample), None)
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if "json" in sample:
            try:
                extra = json.loads(sample["json"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                extra = None
            if isinstance(extra, dict):
                meta = {**extra, **meta}
                text = text if text is not None else extra.get("caption", extra.get("text"))
        caption, reason = _caption_or_reason(text)
        image_key = next((key for key in WDS_IMAGE_KEYS if key in sample), None)
        if reason is None and image_key is None:
            reason = "missing_image"
        if reason is None:
            try:
                image = load_rgb_image(sample[image_key], self.size)
            except BadImageError as error:
                reason = error.reason
        if reason is not None:
            self.stats.skip(reason)
            return None
        self.stats.accept()
        return CaptionRecord(image, caption, meta)


# --------------------------------------------------------------------------- dispatch


def detect_format(path_or_spec: str | os.PathLike | Sequence[str]) -> str:
    """``"imagefolder"``, ``"webdataset"`` or ``"hf_disk"``, from the path alone."""
    if not isinstance(path_or_spec, (str, os.PathLike)):
        return "webdataset"
    text = os.fspath(path_or_spec)
    if any(mark in text for mark in "*?[{") or "::" in text or _is_remote(text):
        return "webdataset"
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"caption dataset not found: {text}")
    if path.is_file() and text.endswith(TAR_SUFFIXES):
        return "webdataset"
    if path.is_dir():
        if find_metadata(path) is not None:
            return "imagefolder"
        if any((path / marker).is_file() for marker in HF_MARKERS):
            return "hf_disk"
        if any(child.name.endswith(TAR_SUFFIXES) for child in path.iterdir()):
            return "webdataset"
    raise ValueError(
        f"cannot tell the dataset format of {text}: expected a directory with metadata.jsonl "
        f"(imagefolder), with {'/'.join(HF_MARKERS)} (datasets.save_to_disk), "
        "or .tar shards (a file, a directory of them, a glob or a brace pattern)")


def open_caption_dataset(path_or_spec: str | os.PathLike | Sequence[str], size: int,
                         **kw: Any) -> ImageFolderCaptions | WebDatasetCaptions | HFDiskCaptions:
    """Open any supported caption dataset; ``kw`` go to the chosen reader."""
    kind = detect_format(path_or_spec)
    if kind == "imagefolder":
        return ImageFolderCaptions(path_or_spec, size, **kw)
    if kind == "hf_disk":
        return HFDiskCaptions(path_or_spec, size, **kw)
    spec = path_or_spec
    if isinstance(spec, (str, os.PathLike)) and Path(spec).is_dir():
        spec = sorted(str(child) for child in Path(spec).iterdir()
                      if child.name.endswith(TAR_SUFFIXES))
    return WebDatasetCaptions(spec, size, **kw)


def read_records(path_or_spec: str | os.PathLike | Sequence[str], size: int,
                 limit: int | None = None) -> list[CaptionRecord]:
    """The first ``limit`` usable records (all when None), in order; broken ones are skipped."""
    dataset = open_caption_dataset(path_or_spec, size)
    records = (dataset[i] for i in range(len(dataset))) if hasattr(dataset, "__len__") else iter(dataset)
    return list(itertools.islice(records, limit))


# --------------------------------------------------------------------------- writing


class ImageFolderWriter:
    """Build an HF ``imagefolder`` directory (PNGs + ``metadata.jsonl``) atomically.

    Files go to a hidden sibling temp dir renamed into place by :meth:`commit`, so an
    interrupted run never leaves a half-written dataset that looks complete.
    Use as a context manager: commit on success, clean up on error.
    """

    def __init__(self, out_dir: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.out_dir, self.overwrite = Path(out_dir), overwrite
        if self.out_dir.is_file() or (self.out_dir.is_dir() and any(self.out_dir.iterdir())
                                      and not overwrite):
            raise FileExistsError(f"{self.out_dir} exists and is not empty; "
                                  "pass overwrite=True (--overwrite) to replace it")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = staging_directory(self.out_dir)
        self._metadata: dict[str, IO[str]] = {}
        self.counts: Counter = Counter()

    def add(self, image: Image.Image | torch.Tensor, text: str, *, split: str = "",
            **fields: Any) -> str:
        """Write one image (PNG) and its metadata row; returns the file name within ``split``."""
        folder = self._tmp / split
        if split not in self._metadata:
            folder.mkdir(parents=True, exist_ok=True)
            self._metadata[split] = open(folder / "metadata.jsonl", "w", encoding="utf-8")
        file_name = f"{self.counts[split]:06d}.png"
        picture = to_pil(image) if isinstance(image, torch.Tensor) else image
        picture.save(folder / file_name, format="PNG")
        row = {"file_name": file_name, "text": text, **fields}
        self._metadata[split].write(json.dumps(row, ensure_ascii=False) + "\n")
        self.counts[split] += 1
        return file_name

    def _close(self) -> None:
        for stream in self._metadata.values():
            stream.close()
        self._metadata.clear()

    def commit(self) -> Path:
        """Move the finished dataset into ``out_dir`` (replacing it if ``overwrite``)."""
        self._close()
        return publish_directory(self._tmp, self.out_dir)

    def abort(self) -> None:
        self._close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "ImageFolderWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
