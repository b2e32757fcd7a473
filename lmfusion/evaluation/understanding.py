"""Image understanding: caption held-out images and score the captions (paper: COCO CIDEr).

Besides CIDEr-D and exact match, shapes captions can be *parsed* back into a scene, so each
caption also gets per-attribute accuracy (shape, colour, size, position) against the scene that
was drawn: the captioning counterpart of the oracle scores used for generation, and a direct
reading of what the model does and does not see.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..data.shapes import cell_of
from ..data.shapes_oracle import infer_relation, parse_shapes_caption
from ..sampling.pipeline import LMFusionPipeline
from .cider import cider_d, exact_match

ATTRIBUTES = ("shape", "colour", "size", "position")
_INVERSE = {"above": "below", "below": "above", "to the left of": "to the right of", "to the right of": "to the left of"}


def caption_images(pipe: LMFusionPipeline, images: torch.Tensor, batch_size: int = 16, max_new_tokens: int = 32) -> list[str]:
    """Greedy captions (the paper's protocol) for ``[N, 3, S, S]`` images, in batches."""
    captions: list[str] = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size]
        captions.extend(pipe.caption(chunk, max_new_tokens=max_new_tokens))
    return captions


def _scene_relation(objects: Sequence[dict], relation: str | None) -> str:
    if len(objects) != 2:
        return ""
    return relation or infer_relation(objects)


def _attribute_hits(got: Sequence[dict], want: Sequence[dict]) -> dict[str, float]:
    return {a: sum(g[a] == w[a] for g, w in zip(got, want)) / len(want) for a in ("shape", "colour", "size")}


def caption_scene_scores(caption: str, objects: Sequence[dict], relation: str | None = None) -> dict[str, Any]:
    """Per-attribute accuracy of one caption against the drawn scene (all 0 if it does not parse).

    A pair may be described in either order ("A above B" is "B below A"), so both readings are
    tried and the better one counts.
    """
    zero = {a: 0.0 for a in ATTRIBUTES} | {"parsed": False, "all_correct": False}
    try:
        got, got_relation = parse_shapes_caption(caption)
    except ValueError:
        return zero
    want = [dict(o) for o in objects]
    if len(got) != len(want):
        return zero | {"parsed": True}
    if len(want) == 1:
        scores = _attribute_hits(got, want)
        scores["position"] = float(cell_of(got[0]["x"], got[0]["y"]) == cell_of(want[0]["x"], want[0]["y"]))
    else:
        want_relation = _scene_relation(want, relation)
        readings = [(got, got_relation), (got[::-1], _INVERSE[got_relation])]
        candidates = []
        for order, rel in readings:
            scores = _attribute_hits(order, want)
            scores["position"] = float(rel == want_relation)
            candidates.append(scores)
        scores = max(candidates, key=lambda s: sum(s.values()))
    return scores | {"parsed": True, "all_correct": all(scores[a] == 1.0 for a in ATTRIBUTES)}


def mean_scores(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, float]:
    return {k: sum(float(r[k]) for r in rows) / len(rows) for k in keys} if rows else {}


def blind_cider(references: Sequence[str]) -> float:
    """CIDEr-D (x100) of the best blind captioner: one reference caption, said for every image.

    Templated captions share most of their n-grams, so a constant caption already scores high
    (about 100 on the shapes set). A model's CIDEr only shows that it reads the image where it
    beats this.
    """
    refs = [[r] for r in references]
    return max(100.0 * cider_d([caption] * len(refs), refs)[0] for caption in dict.fromkeys(references))


def caption_metrics(captions: Sequence[str], references: Sequence[str], metas: Sequence[dict]) -> dict[str, Any]:
    """CIDEr-D (x100, as papers print it), exact match and, for shapes, scene accuracy."""
    refs = [[r] for r in references]
    cider, per_image = cider_d(captions, refs)
    result: dict[str, Any] = {
        "n": len(captions),
        "cider": 100.0 * cider,
        "exact_match": exact_match(captions, refs),
        "distinct_captions": len(set(captions)),
        "blind_cider": blind_cider(references),
        "per_image_cider": [100.0 * s for s in per_image],
    }
    if metas and all(m.get("objects") for m in metas):
        rows = [caption_scene_scores(c, m["objects"], m.get("relation")) for c, m in zip(captions, metas)]
        result["scene"] = mean_scores(rows, (*ATTRIBUTES, "all_correct", "parsed"))
    return result
