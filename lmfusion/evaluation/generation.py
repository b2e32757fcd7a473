"""Image generation: sample one image per held-out caption, then FID and oracle faithfulness.

FID (paper: COCO-30K FID) compares the *distribution* of generated images with the real
test images in the feature space of the project's shapes classifier. The oracle scores (in the
spirit of GenEval) check each image against the scene its prompt describes: right shapes,
colours, sizes, position / relation, and object count.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..sampling.pipeline import LMFusionPipeline
from .feature_net import TrainedFeatureNet, label_accuracy, label_matrix
from .fid import fid_from_features

ORACLE_KEYS = ("shape", "colour", "size", "position", "count", "all_correct", "white_background", "colour_on_white")


def generate_images(
    pipe: LMFusionPipeline,
    prompts: Sequence[str],
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = 1.0,
    scheduler: str | None = None,
    batch_size: int = 16,
    **options,
) -> torch.Tensor:
    """``[N, 3, S, S]`` images in [0, 1], image i from ``prompts[i]`` with seed ``seed + i``.

    The pipeline's own sampler, ``batch_size`` prompts per call (one forward per step for the
    batch and both guidance branches), with one seed per image; image i is exactly
    ``pipe.generate_image(prompts[i], seed=seed + i)``. ``options`` go to it as they are
    (``guidance``).
    """
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        seeds = [seed + start + k for k in range(len(chunk))]
        images.append(pipe.generate_image(chunk, steps, guidance_scale, seeds, scheduler, output="tensor", progress=False,
                                          **options))
    return torch.cat(images)


def oracle_scores(images: torch.Tensor, metas: Sequence[dict]) -> dict[str, float]:
    """Mean oracle accuracy per attribute over generated images (shapes data only)."""
    from ..data.shapes_oracle import score_caption_faithfulness

    rows = [score_caption_faithfulness(img, m["objects"], m.get("relation") or None) for img, m in zip(images, metas)]
    return {k: float(np.mean([float(r[k]) for r in rows])) for k in ORACLE_KEYS}


def generation_metrics(
    generated: torch.Tensor,
    real: torch.Tensor,
    metas: Sequence[dict],
    feature_net: TrainedFeatureNet,
    reference: torch.Tensor | None = None,
    prompts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """FID of generated vs real images; oracle scores when the data stores scenes.

    ``reference`` (other real images, e.g. from the train split, as many as ``real``) gives
    FID(real, real'): the floor set by sampling noise alone at this n, which a perfect
    generator would score. Without it an FID of, say, 3 cannot be told from zero.

    ``prompts`` (the caption each image was generated from) adds ``prompt_labels``: how well the
    feature net's labels of each generated image match its prompt's (for word labels on a
    class-captioned set such as Fashion-MNIST, ``all_labels_correct`` is class accuracy), beside
    the same score on the real images, the net's own ceiling.
    """
    real_features = feature_net.features(real)
    result: dict[str, Any] = {
        "n": int(generated.shape[0]),
        "fid": fid_from_features(real_features, feature_net.features(generated)),
    }
    if reference is not None:
        result["fid_real_vs_real"] = fid_from_features(real_features, feature_net.features(reference))
    if prompts is not None:
        targets = label_matrix(feature_net.kind, feature_net.label_names, prompts, metas)
        result["prompt_labels"] = label_accuracy(feature_net, generated, targets)
        result["prompt_labels_on_real"] = label_accuracy(feature_net, real, targets)
    if metas and all(m.get("objects") for m in metas):
        result["oracle"] = oracle_scores(generated, metas)
        result["oracle_on_real"] = oracle_scores(real, metas)  # the oracle's own ceiling on clean images
    return result
