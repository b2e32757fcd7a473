"""Write a generated dataset as train/ and test/ folders of one JSON-lines file plus images/.

Shared by the shapes-edits and shapes-chat generators: the last round(count * test_fraction)
indices form test/, rows go to a staging folder, and the whole folder is published in one rename,
so an interrupted run leaves nothing that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from ..utils import publish_directory, staging_directory

# (index, split, split folder) -> the row to write; it saves its images under folder/images/.
RowWriter = Callable[[int, str, Path], dict]


def check_split_args(count: int, test_fraction: float, out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """The output folder, after a one-line error for a bad count, fraction or occupied folder."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    out = Path(out_dir)
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not overwrite):
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    return out


def write_splits(out: Path, count: int, test_fraction: float, rows_file: str, write_row: RowWriter, *,
                 desc: str, unit: str, progress: bool = True, extra_files: dict[str, str] | None = None) -> Path:
    """Call `write_row` for every index in order and publish the folder; `extra_files` maps a
    top-level file name to its text (e.g. the generator's settings)."""
    n_test = int(round(count * test_fraction))
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = staging_directory(out)
    streams = {}
    try:
        for split in ("train", "test"):
            (staged / split / "images").mkdir(parents=True)
            streams[split] = open(staged / split / rows_file, "w", encoding="utf-8")
        for index in tqdm(range(count), desc=desc, unit=unit, disable=not progress):
            split = "test" if index >= count - n_test else "train"
            streams[split].write(json.dumps(write_row(index, split, staged / split)) + "\n")
        for stream in streams.values():
            stream.close()
        for name, text in (extra_files or {}).items():
            (staged / name).write_text(text)
        return publish_directory(staged, out)
    except BaseException:
        for stream in streams.values():
            stream.close()
        shutil.rmtree(staged, ignore_errors=True)
        raise
