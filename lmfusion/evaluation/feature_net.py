"""The feature network behind this project's FID: a small CNN trained on the dataset itself.

FID normally uses Inception-v3 features, which need a download and mean little for 64 px
flat-colour shapes. Instead a small CNN is trained (once per dataset, then cached as
safetensors) to predict what a caption talks about: for shapes, which shapes, colours and
sizes are present, which of the 3x3 cells are occupied and whether there are two objects;
for any other caption data, which of the most frequent caption words occur. Its penultimate
layer is then a feature space in which exactly those properties are linearly visible, so the
Fréchet distance in it measures whether generated images get them right *as a distribution*.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.shapes import COLOURS, GRID, SHAPES, SIZES, cell_of

FORMAT_VERSION = 1


@dataclass(frozen=True)
class FeatureNetRecipe:
    """Everything that decides the trained weights; part of the cache key."""

    input_size: int = 32
    width: int = 16
    feature_dim: int = 64
    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-2
    max_train_images: int = 4000
    vocab_size: int = 64  # labels for non-shapes data: presence of the most frequent caption words
    seed: int = 0


# --------------------------------------------------------------------------------- labels
def shapes_label_names() -> list[str]:
    names = [f"shape:{s}" for s in SHAPES] + [f"colour:{c}" for c in COLOURS] + [f"size:{z}" for z in SIZES]
    return names + [f"cell:{col},{row}" for row in range(GRID) for col in range(GRID)] + ["two_objects"]


def shapes_labels(objects: Sequence[dict]) -> set[str]:
    """Label names that hold for one scene's stored objects."""
    labels = {"two_objects"} if len(objects) == 2 else set()
    for obj in objects:
        labels |= {f"shape:{obj['shape']}", f"colour:{obj['colour']}", f"size:{obj['size']}"}
        labels.add("cell:{},{}".format(*cell_of(obj["x"], obj["y"])))
    return labels


def _words(caption: str) -> set[str]:
    return set(re.findall(r"[a-z]+", caption.lower()))


def label_space(captions: Sequence[str], metas: Sequence[dict], vocab_size: int) -> tuple[str, list[str]]:
    """("shapes", names) when every record has structured objects, else ("words", top words)."""
    if metas and all(isinstance(m.get("objects"), list) and m["objects"] for m in metas):
        return "shapes", shapes_label_names()
    counts = Counter(word for caption in captions for word in _words(caption))
    return "words", [f"word:{w}" for w, _ in counts.most_common(vocab_size)]


def label_matrix(kind: str, names: Sequence[str], captions: Sequence[str], metas: Sequence[dict]) -> torch.Tensor:
    """``[N, len(names)]`` multi-hot targets."""
    index = {name: i for i, name in enumerate(names)}
    targets = torch.zeros(len(captions), len(names))
    for row, (caption, meta) in enumerate(zip(captions, metas)):
        present = shapes_labels(meta["objects"]) if kind == "shapes" else {f"word:{w}" for w in _words(caption)}
        for name in present & index.keys():
            targets[row, index[name]] = 1.0
    return targets


# --------------------------------------------------------------------------------- network
def _stage(channels_in: int, channels_out: int) -> list[nn.Module]:
    # BatchNorm makes the few-epoch CPU training converge (without it, it stalls at ~0.85 accuracy).
    return [nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.BatchNorm2d(channels_out), nn.ReLU(), nn.MaxPool2d(2)]


class FeatureNet(nn.Module):
    """Three conv stages then a dense feature layer; no global pooling, so *where* survives."""

    def __init__(self, recipe: FeatureNetRecipe, n_labels: int):
        super().__init__()
        w = recipe.width
        self.input_size = recipe.input_size
        self.convs = nn.Sequential(*_stage(3, w), *_stage(w, 2 * w), *_stage(2 * w, 2 * w))
        cells = (recipe.input_size // 8) ** 2
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * cells, recipe.feature_dim), nn.ReLU())
        self.head = nn.Linear(recipe.feature_dim, n_labels)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] at any size -> the net's input size, centred at 0."""
        images = images.float()
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            size = (self.input_size, self.input_size)
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        return images.clamp(0, 1) * 2 - 1

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(self.convs(self.prepare(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))


@dataclass
class TrainedFeatureNet:
    net: FeatureNet
    recipe: FeatureNetRecipe
    kind: str
    label_names: list[str]
    metrics: dict

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Penultimate-layer features ``[N, feature_dim]`` (float64) for FID."""
        self.net.eval()
        chunks = [self.net.embed(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
        return torch.cat(chunks).double().numpy()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        return self.net(images) > 0


def train_feature_net(
    train_images: torch.Tensor, train_captions: Sequence[str], train_metas: Sequence[dict],
    test_images: torch.Tensor, test_captions: Sequence[str], test_metas: Sequence[dict],
    recipe: FeatureNetRecipe = FeatureNetRecipe(),
) -> TrainedFeatureNet:
    """Train on the train split with multi-label BCE; report label accuracy on the test split."""
    with single_thread(), torch.random.fork_rng(devices=[]):  # seeded, without resetting the caller's RNG
        return _train(train_images, train_captions, train_metas, test_images, test_captions, test_metas, recipe)


@contextlib.contextmanager
def single_thread():
    """Run with one torch thread: convolutions this small gain little from more, and on a shared,
    oversubscribed CPU two threads were measured 13x slower than one (7.3 s vs 0.54 s an epoch)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(train_images, train_captions, train_metas, test_images, test_captions, test_metas, recipe):
    kind, names = label_space(train_captions, train_metas, recipe.vocab_size)
    targets = label_matrix(kind, names, train_captions, train_metas)
    generator = torch.Generator().manual_seed(recipe.seed)
    keep = torch.randperm(len(train_captions), generator=generator)[: recipe.max_train_images]
    torch.manual_seed(recipe.seed)
    net = FeatureNet(recipe, len(names))
    inputs = net.prepare(train_images[keep]) * 0.5 + 0.5  # resize once, not every epoch
    targets = targets[keep]
    optimizer = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=1e-4)
    steps = recipe.epochs * -(-len(keep) // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=max(steps, 1))
    net.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(keep), generator=generator)
        for start in range(0, len(keep), recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            loss = F.binary_cross_entropy_with_logits(net(inputs[batch]), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    trained = TrainedFeatureNet(net.eval(), recipe, kind, list(names), {})
    trained.metrics = label_accuracy(trained, test_images, label_matrix(kind, names, test_captions, test_metas))
    trained.metrics["train_images"] = int(len(keep))
    return trained


def label_accuracy(trained: TrainedFeatureNet, images: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per-label accuracy, balanced accuracy and the share of images with every label right.

    Labels are sparse (most are absent in most images), so plain accuracy of an untrained net
    is already ~0.8; balanced accuracy (mean of hit rate on present and on absent labels) is 0.5
    for a net that ignores the image, which makes it the number to judge the net by.
    """
    predicted, truth = trained.predict(images), targets.bool()
    correct = predicted == truth
    hit_rate = (predicted & truth).sum(0) / truth.sum(0).clamp(min=1)
    reject_rate = (~predicted & ~truth).sum(0) / (~truth).sum(0).clamp(min=1)
    seen = truth.any(0) & (~truth).any(0)  # labels with both cases in the test set
    balanced = ((hit_rate + reject_rate) / 2)[seen].mean() if bool(seen.any()) else torch.tensor(float("nan"))
    return {
        "label_accuracy": float(correct.float().mean()),
        "balanced_accuracy": float(balanced),
        "all_labels_correct": float(correct.all(dim=1).float().mean()),
        "test_images": int(images.shape[0]),
    }


# --------------------------------------------------------------------------------- cache
def cache_key(train_metadata: bytes, recipe: FeatureNetRecipe) -> str:
    """Same training data + same recipe -> same weights, so the file can be reused."""
    digest = hashlib.sha256(train_metadata)
    digest.update(json.dumps({"v": FORMAT_VERSION, **dataclasses.asdict(recipe)}, sort_keys=True).encode())
    return digest.hexdigest()[:20]


def save_feature_net(trained: TrainedFeatureNet, path: str | Path) -> Path:
    from safetensors.torch import save

    from ..utils import atomic_write_bytes

    metadata = {
        "format_version": str(FORMAT_VERSION),
        "recipe": json.dumps(dataclasses.asdict(trained.recipe)),
        "kind": trained.kind,
        "label_names": json.dumps(trained.label_names),
        "metrics": json.dumps(trained.metrics),
    }
    state = {k: v.contiguous() for k, v in trained.net.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata=metadata))
    return Path(path)


def load_feature_net(path: str | Path) -> TrainedFeatureNet:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(f"{path} is not a feature net of format {FORMAT_VERSION}")
    recipe = FeatureNetRecipe(**json.loads(metadata["recipe"]))
    names = json.loads(metadata["label_names"])
    net = FeatureNet(recipe, len(names))
    net.load_state_dict(load_file(str(path)))
    return TrainedFeatureNet(net.eval(), recipe, metadata["kind"], names, json.loads(metadata["metrics"]))
