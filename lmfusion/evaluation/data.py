"""Evaluation data: the train/test splits of a caption dataset as tensors, and the cached feature net."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..base_models import cache_dir
from ..data import read_records
from .feature_net import (
    FeatureNetRecipe,
    TrainedFeatureNet,
    cache_key,
    load_feature_net,
    save_feature_net,
    train_feature_net,
)

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Images ``[N, 3, S, S]`` in [0, 1], their captions and metadata rows, in dataset order."""

    images: torch.Tensor
    captions: list[str]
    metas: list[dict]

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def has_scenes(self) -> bool:
        """True when every record stores its shapes scene, so the oracle can score it."""
        return bool(self.metas) and all(isinstance(m.get("objects"), list) and m["objects"] for m in self.metas)


def split_paths(data: str | Path) -> tuple[Path, Path]:
    """(train, test) folders: ``DATA/train`` and ``DATA/test`` when both exist, else DATA twice.

    Evaluating on the training images says little about generalisation, so that case warns.
    """
    root = Path(data)
    if not root.exists():
        raise FileNotFoundError(f"evaluation data not found: {root}")
    train, test = root / "train", root / "test"
    if (train / "metadata.jsonl").is_file() and (test / "metadata.jsonl").is_file():
        return train, test
    if (test / "metadata.jsonl").is_file():
        return test, test
    log.warning("%s has no train/ and test/ splits: evaluating on the same records the feature net trains on", root)
    return root, root


def load_split(path: str | Path, size: int, limit: int | None = None) -> Split:
    """The first ``limit`` records (all when None) at ``size`` px; skips broken records like training does."""
    records = read_records(path, size, limit)
    if not records:
        raise ValueError(f"no usable records in {path}")
    images = torch.stack([r.image for r in records])
    return Split(images, [r.caption for r in records], [r.meta for r in records])


def _data_fingerprint(split: Split) -> bytes:
    """Bytes that change whenever the training images, captions or scenes change."""
    digest = hashlib.sha256((split.images * 255).round().to(torch.uint8).numpy().tobytes())
    scenes = [{k: m.get(k) for k in ("objects", "relation")} for m in split.metas]
    digest.update(json.dumps([split.captions, scenes], sort_keys=True).encode())
    return digest.digest()


def feature_net_for(
    data: str | Path,
    recipe: FeatureNetRecipe = FeatureNetRecipe(),
    cache: str | Path | None = None,
    report: Callable[[str], None] = log.info,
) -> tuple[TrainedFeatureNet, Path]:
    """The feature net of this dataset: loaded from the cache, or trained once and cached.

    The cache file is named by a hash of the training data and the recipe, so a regenerated
    or different dataset never reuses a stale net.
    """
    train_path, test_path = split_paths(data)
    train = load_split(train_path, recipe.input_size, recipe.max_train_images)
    folder = Path(cache) if cache is not None else cache_dir() / "feature_nets"
    path = folder / f"{cache_key(_data_fingerprint(train), recipe)}.safetensors"
    if path.is_file():
        return load_feature_net(path), path
    test = load_split(test_path, recipe.input_size, 1000)
    report(f"training the FID feature net on {len(train)} images of {train_path} (once; cached at {path})")
    trained = train_feature_net(train.images, train.captions, train.metas, test.images, test.captions, test.metas, recipe)
    metrics = trained.metrics
    report(f"feature net: test balanced accuracy {metrics['balanced_accuracy']:.3f}, label accuracy "
           f"{metrics['label_accuracy']:.3f}, all labels right {metrics['all_labels_correct']:.3f}")
    save_feature_net(trained, path)
    return trained, path
