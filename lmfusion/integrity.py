"""Damage detection for saved folders: a manifest of every file's size and CRC-32, written last.

A folder published with `atomic_directory` is complete when it appears, but files can still be
damaged afterwards: truncated by a copy onto a full disk, cut short by a sync tool, overwritten
by hand. `write_manifest` records each file's size and checksum after everything else is
written; `verify_manifest` re-reads them and names the first file that differs. CRC-32 (zlib)
hashes at several GB/s, so verifying even an 8B-parameter adapter costs seconds.

Every read of a saved file goes through `read_json` / `read_safetensors`, which turn a
damaged or foreign file into a `CheckpointError`: one line naming the file and the problem
(the CLI prints it instead of a traceback).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

MANIFEST = "manifest.json"
FORMAT = "lmfusion-manifest/1"
_CHUNK = 16 << 20


class CheckpointError(ValueError):
    """A saved file is missing, damaged or not what it should be. The message names the file."""


def crc32_file(path: Path) -> str:
    value = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def write_manifest(folder: str | Path, editable: tuple[str, ...] = ()) -> Path:
    """Record size and CRC-32 of every file under `folder` (call it after the last other write).

    Files named in `editable` are left out: small JSON meant to be edited by hand (a model's
    `lmfusion_config.json`, e.g. to point `base_model` elsewhere), checked by parsing instead.
    """
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, *editable)):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "crc32": crc32_file(path)}
    target = folder / MANIFEST
    target.write_text(json.dumps({"format": FORMAT, "files": files}, indent=1) + "\n")
    return target


def has_manifest(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def verify_manifest(folder: str | Path, required: bool = False) -> bool:
    """Check every file the manifest lists; raise CheckpointError naming the first damaged one.

    Returns False when there is no manifest (folders written before manifests existed) unless
    `required`, True when all files match.
    """
    folder = Path(folder)
    if not has_manifest(folder):
        if required:
            raise CheckpointError(f"{folder / MANIFEST}: missing (the folder is incomplete or not an LMFusion checkpoint)")
        return False
    manifest = read_json(folder / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{folder / MANIFEST}: not an LMFusion manifest (expected format {FORMAT!r})")
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != expected.get("size"):
            raise CheckpointError(f"{path}: damaged, {size} bytes where {MANIFEST} records {expected.get('size')}")
        if crc32_file(path) != expected.get("crc32"):
            raise CheckpointError(f"{path}: damaged, its checksum differs from the one {MANIFEST} records")
    return True


def read_json(path: str | Path):
    """A JSON file's content, or a CheckpointError naming the file and the parse problem."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def read_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or a CheckpointError naming the file (truncated, foreign, missing)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
