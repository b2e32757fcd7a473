"""What identifies a dataset's content and a codec's output cheaply, for latent caches and shards.

Both the in-memory latent cache (lmfusion.training.data) and the latent shards
(lmfusion.data.latent_shards) are only valid for one (dataset content, image size, codec), so
both key on these two fingerprints.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch


def dataset_fingerprint(path: str) -> dict:
    """Every file's name, size and mtime.

    Hashing all image bytes would cost as much as decoding them; sizes and mtimes change whenever
    a file is rewritten, which is what matters for a cache.
    """
    from .formats import expand_shards

    if Path(path).exists():
        root = Path(path).resolve()
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and ".lmfusion" not in p.parts)
    else:  # a glob / brace pattern of WebDataset shards
        files = [Path(u).resolve() for u in expand_shards(path) if os.path.isfile(u)]
    listing = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return {"path": str(Path(path).resolve()) if Path(path).exists() else path, "files": listing}


def codec_fingerprint(codec, image_size: int) -> str:
    """A hash of the codec's output on a fixed probe image.

    The codec's config names it, but its weights or its normalisation code can change under the
    same name; encoding one synthetic image catches both. Rounded, so that a different thread
    count (a different float summation order) does not invalidate the cache.
    """
    ramp = torch.linspace(0, 1, image_size)
    probe = torch.stack([ramp.view(1, -1).expand(image_size, -1), ramp.view(-1, 1).expand(-1, image_size),
                         (ramp.view(1, -1) * ramp.view(-1, 1))]).unsqueeze(0)
    device = next((p.device for p in codec.parameters()), torch.device("cpu")) if hasattr(codec, "parameters") else "cpu"
    latents = codec.encode(probe.to(device)).float().cpu()
    return hashlib.sha256((latents * 1e3).round().to(torch.int64).numpy().tobytes()).hexdigest()[:16]
