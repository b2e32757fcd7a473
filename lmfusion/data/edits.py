"""Image-editing datasets: (source image, instruction, target image) triples.

One layout serves the built-in shapes edits (:mod:`lmfusion.data.shapes_edits`) and a real
editing dataset (MagicBrush, InstructPix2Pix exports): a folder with ``edits.jsonl`` (or
``train/edits.jsonl``), one JSON row per triple::

    {"source": "images/000000_source.png", "target": "images/000000_target.png",
     "instruction": "make the red circle blue", ...any other fields, kept as meta}

Paths are relative to the JSONL file. Common spellings of the three fields are accepted
(``source_img``/``input_image``, ``target_img``/``edited_image``/``output_image``, ``edit``/
``prompt``), so an export of another dataset needs no rewriting. WebDataset shards whose
samples hold ``source.<ext>``, ``target.<ext>`` and ``instruction.txt`` (or ``txt``) are read
too. As with the caption readers, broken rows are skipped and counted in ``.stats``, and only a
dataset with nothing usable left is an error (:class:`NoUsableDataError`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from .formats import DataStats, NoUsableDataError, WebDatasetCaptions, _caption_or_reason
from .images import BadImageError, load_rgb_image, verify_image

log = logging.getLogger(__name__)

EDITS_FILE = "edits.jsonl"
SOURCE_KEYS = ("source", "source_image", "source_img", "input_image", "original_image")
TARGET_KEYS = ("target", "target_image", "target_img", "edited_image", "output_image")
INSTRUCTION_KEYS = ("instruction", "edit", "prompt", "text")
WDS_EXTS = ("png", "jpg", "jpeg", "webp")


class EditRecord(NamedTuple):
    source: torch.Tensor  # [3, size, size] in [0, 1]
    target: torch.Tensor
    instruction: str
    meta: dict[str, Any]


def find_edits_file(root: str | os.PathLike) -> Path | None:
    """``root/edits.jsonl``, ``root/train/edits.jsonl``, or ``root`` itself when it is a JSONL file."""
    root = Path(root)
    if root.is_file() and root.suffix == ".jsonl":
        return root
    for candidate in (root / EDITS_FILE, root / "train" / EDITS_FILE):
        if candidate.is_file():
            return candidate
    return None


def is_edit_dataset(path: str | os.PathLike) -> bool:
    """Whether `path` is the JSONL edit layout. WebDataset shards of edits look like caption shards
    from outside, so training is told about them (``task: edit``) rather than guessing."""
    return find_edits_file(path) is not None


def _first(row: dict, keys: tuple[str, ...]) -> Any:
    return next((row[key] for key in keys if key in row), None)


class EditFolder(Dataset):
    """The JSONL layout, scanned once at construction (images verified with PIL when `validate`).

    An image that still fails when loaded is counted once, remembered, and replaced by the next
    good row, as the caption readers do (a map-style dataset cannot shrink mid-epoch).
    """

    def __init__(self, root: str | os.PathLike, size: int, *, validate: bool = True) -> None:
        path = find_edits_file(root)
        if path is None:
            raise FileNotFoundError(f"no {EDITS_FILE} in {root} or {Path(root) / 'train'}")
        self.path, self.size = path, size
        self.stats = DataStats(str(path))
        self._items: list[tuple[Path, Path, str, dict]] = []
        self._bad: set[int] = set()
        with open(path, encoding="utf-8") as stream:
            for line in stream:
                if line.strip():
                    self._scan(line, path.parent, validate)
        if self.stats.ok <= 0:
            raise NoUsableDataError(f"no usable edit records in {path}: {self.stats.summary()}")

    def _scan(self, line: str, folder: Path, validate: bool) -> None:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        source = _first(row, SOURCE_KEYS) if isinstance(row, dict) else None
        target = _first(row, TARGET_KEYS) if isinstance(row, dict) else None
        if not (isinstance(source, str) and isinstance(target, str)):
            self.stats.skip("bad_metadata")
            return
        instruction, reason = _caption_or_reason(_first(row, INSTRUCTION_KEYS))
        paths = (folder / source, folder / target)
        if reason is None and not all(p.is_file() for p in paths):
            reason = "missing_file"
        if reason is None and validate:
            try:
                for p in paths:
                    verify_image(p)
            except BadImageError as error:
                reason = error.reason
        if reason is not None:
            self.stats.skip(reason.replace("caption", "instruction"))
            return
        self.stats.accept()
        self._items.append((paths[0], paths[1], instruction, row))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> EditRecord:
        for offset in range(len(self)):
            current = (index + offset) % len(self)
            if current in self._bad:
                continue
            source, target, instruction, meta = self._items[current]
            try:
                return EditRecord(load_rgb_image(source, self.size), load_rgb_image(target, self.size),
                                  instruction, dict(meta))
            except BadImageError as error:
                self._bad.add(current)
                self.stats.demote(error.reason)
                log.warning("skipping %s", error)
        raise NoUsableDataError(f"every edit record failed to load: {self.stats.summary()}")


class EditWebDataset(WebDatasetCaptions):
    """WebDataset shards of edits: each sample's ``source.*``, ``target.*`` and ``instruction.txt``
    (or ``txt``); a ``json`` member, when present, is kept as meta. The tar reading, worker
    split and skip counting are the caption reader's; only the sample decoding differs."""

    def _decode(self, sample: dict) -> EditRecord | None:
        def member(stem: str) -> bytes | None:
            return next((sample[f"{stem}.{ext}"] for ext in WDS_EXTS if f"{stem}.{ext}" in sample), None)

        text = sample.get("instruction.txt", sample.get("txt"))
        instruction, reason = _caption_or_reason(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)
        source, target = member("source"), member("target")
        if reason is None and (source is None or target is None):
            reason = "missing_image"
        images = []
        if reason is None:
            try:
                images = [load_rgb_image(blob, self.size) for blob in (source, target)]
            except BadImageError as error:
                reason = error.reason
        if reason is not None:
            self.stats.skip(reason.replace("caption", "instruction"))
            return None
        meta: dict[str, Any] = {"key": sample.get("__key__"), "url": sample.get("__url__")}
        try:
            extra = json.loads(sample["json"]) if "json" in sample else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            extra = None
        self.stats.accept()
        return EditRecord(images[0], images[1], instruction, {**(extra if isinstance(extra, dict) else {}), **meta})


def open_edit_dataset(path, size: int):
    """An EditFolder for a JSONL layout, else an EditWebDataset for tar shards."""
    if find_edits_file(path) is not None:
        return EditFolder(path, size)
    return EditWebDataset(path, size)


def read_edit_records(path, size: int, n: int | None = None) -> list[EditRecord]:
    """The first n usable records (all when n is None), in order."""
    dataset = open_edit_dataset(path, size)
    records = []
    if hasattr(dataset, "__len__"):
        for i in range(len(dataset) if n is None else min(n, len(dataset))):
            records.append(dataset[i])
    else:
        for record in dataset:
            records.append(record)
            if n is not None and len(records) >= n:
                break
    return records
