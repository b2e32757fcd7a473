"""Reads a shapes image back into objects, to score generated images against captions.

Pixels are unmixed against the white background: a pixel ``p`` is explained as
``w + a * (c - w)`` for each palette colour ``c``; it belongs to the colour with the
smallest residual if the coverage ``a`` is at least one half.  This keeps antialiased
edges (and mild blur or colour drift in generated images) from turning into spurious
objects of a neighbouring hue.  Connected components then become objects; the shape is
the circle/square/triangle template, fitted to the blob's bbox, that it overlaps best
(a fill-ratio test that also sees corners and apex); the size comes from bbox extent.
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .shapes import BACKGROUND, CELL_PHRASES, COLOURS, RELATIONS, SHAPES, SIZES, cell_centre, cell_of

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)
_NAMES = list(COLOURS)
# Bbox extent (as a fraction of the side) halfway between a small and a large shape.
_SIZE_THRESHOLD = sum(2 * half for half in SIZES.values()) / len(SIZES)


@dataclass(frozen=True)
class DetectedObject:
    shape: str
    colour: str
    size: str
    x: float  # bbox centre, normalised to [0, 1]
    y: float
    area: float  # pixels / image pixels
    fill: float  # pixels / bbox pixels

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_rgb_array(image: torch.Tensor | Image.Image | np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` float64 in 0..255 from a [3,H,W] tensor in [0,1], PIL image or uint8 array."""
    if isinstance(image, torch.Tensor):
        return image.detach().cpu().float().clamp(0, 1).permute(1, 2, 0).numpy() * 255.0
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    return np.asarray(image, dtype=np.float64)


def colour_labels(rgb: np.ndarray, max_residual: float = 70.0, min_coverage: float = 0.5) -> np.ndarray:
    """Per-pixel palette index, or -1 for background / unexplained pixels."""
    background = np.array(BACKGROUND, dtype=np.float64)
    offset = rgb - background  # [H, W, 3]
    directions = _PALETTE - background  # [K, 3]
    lengths2 = (directions**2).sum(axis=1)  # [K]
    projection = offset @ directions.T  # [H, W, K]
    coverage = projection / lengths2
    # Distance from the pixel to the white-to-colour line (Pythagoras on the projection).
    residual = np.sqrt(np.maximum((offset**2).sum(-1, keepdims=True) - projection * coverage, 0.0))
    best = residual.argmin(axis=-1)[..., None]
    # Pick the hue first, then demand coverage: an edge pixel of a blue shape must not
    # be claimed by a colour that merely explains it with more "ink".
    explained = np.take_along_axis(residual, best, axis=-1) < max_residual
    covered = np.take_along_axis(coverage, best, axis=-1) >= min_coverage
    return np.where((explained & covered)[..., 0], best[..., 0], -1)


def _flood_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected component labelling, a fallback for when scipy is unavailable."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    count = 0
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        count += 1
        labels[start] = count
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = count
                    queue.append((ny, nx))
    return labels, count


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """``(labels, count)`` with 4-connectivity, via scipy.ndimage when importable."""
    try:
        from scipy import ndimage
    except ImportError:
        return _flood_components(mask)
    labels, count = ndimage.label(mask)
    return labels, int(count)


@lru_cache(maxsize=4096)
def _template(shape: str, height: int, width: int, pad: int, supersample: int = 8) -> np.ndarray:
    """Coverage of ``shape`` filling a ``height x width`` pixel box, drawn as shapes.py does."""
    size = ((width + 2 * pad) * supersample, (height + 2 * pad) * supersample)
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0 = pad * supersample, pad * supersample
    x1, y1 = x0 + width * supersample - 1, y0 + height * supersample - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    small = canvas.resize((width + 2 * pad, height + 2 * pad), Image.Resampling.BOX)
    template = np.asarray(small, dtype=np.float64) / 255.0
    template.setflags(write=False)  # shared through the cache
    return template


def classify_shape(mask: np.ndarray) -> str:
    """Shape whose antialiased template, fitted to the blob's bbox, best matches the blob.

    This is a fill-ratio test that also looks at where the pixels are (corners, apex),
    and it keeps small shapes recognisable under blur, noise and JPEG ringing better
    than a fill ratio or a few corner pixels alone.
    """
    height, width = mask.shape
    padded = np.pad(mask.astype(np.float64), 1)
    errors = {shape: float(np.abs(padded - _template(shape, height, width, 1)).mean())
              for shape in SHAPES}
    return min(errors, key=errors.get)


def parse_shapes_image(image: torch.Tensor | Image.Image | np.ndarray,
                       min_area_fraction: float = 0.003,
                       max_residual: float = 70.0) -> list[DetectedObject]:
    """Detect coloured shapes, largest first; blobs under ``min_area_fraction`` are noise."""
    rgb = _as_rgb_array(image)
    height, width = rgb.shape[:2]
    labels = colour_labels(rgb, max_residual=max_residual)
    found: list[DetectedObject] = []
    for colour_index, name in enumerate(_NAMES):
        components, count = connected_components(labels == colour_index)
        for component in range(1, count + 1):
            mask = components == component
            ys, xs = np.nonzero(mask)
            if len(ys) < min_area_fraction * height * width:
                continue
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            blob = mask[y0:y1, x0:x1]
            extent = max(y1 - y0, x1 - x0) / min(height, width)
            found.append(DetectedObject(
                shape=classify_shape(blob), colour=name,
                size="large" if extent > _SIZE_THRESHOLD else "small",
                x=float((x0 + x1) / 2 / width), y=float((y0 + y1) / 2 / height),
                area=len(ys) / (height * width), fill=float(blob.mean())))
    return sorted(found, key=lambda obj: -obj.area)


def white_fraction(image: torch.Tensor | Image.Image | np.ndarray, tolerance: float = 40.0) -> float:
    """Share of pixels within ``tolerance`` (RGB distance, 0..255 scale) of the white background."""
    rgb = _as_rgb_array(image)
    return float((np.sqrt(((rgb - np.array(BACKGROUND, dtype=np.float64)) ** 2).sum(-1)) < tolerance).mean())


# A shapes image is mostly background: one large shape covers under 8% of it, two under 16%.
WHITE_BACKGROUND_MIN = 0.6


def relation_holds(subject: DetectedObject | dict, other: DetectedObject | dict, relation: str,
                   margin: float = 0.1) -> bool:
    """Does ``subject <relation> other`` hold, along the dominant axis, by at least ``margin``?"""
    get = lambda obj, key: obj[key] if isinstance(obj, dict) else getattr(obj, key)  # noqa: E731
    dx, dy = get(other, "x") - get(subject, "x"), get(other, "y") - get(subject, "y")
    vertical = abs(dy) >= abs(dx)
    return {"above": vertical and dy > margin, "below": vertical and -dy > margin,
            "to the left of": not vertical and dx > margin,
            "to the right of": not vertical and -dx > margin}[relation]


def infer_relation(objects: Sequence[dict[str, Any]]) -> str:
    """The relation of objects[0] to objects[1] implied by their stored positions."""
    for relation in RELATIONS:
        if relation_holds(objects[0], objects[1], relation, margin=0.0):
            return relation
    raise ValueError("two objects at the same position have no relation")


def _match(expected: Sequence[dict[str, Any]],
           detected: Sequence[DetectedObject]) -> list[DetectedObject | None]:
    """Assignment of detected objects to expected ones maximising attribute agreement."""
    def agreement(want: dict[str, Any], got: DetectedObject | None) -> float:
        if got is None:
            return 0.0
        score = 4.0 * (got.colour == want["colour"]) + 2.0 * (got.shape == want["shape"])
        score += 1.0 * (got.size == want["size"])
        if "x" in want and "y" in want:
            score -= 0.1 * float(np.hypot(got.x - want["x"], got.y - want["y"]))
        return score

    candidates = list(detected[:10]) + [None] * len(expected)
    best = max(itertools.permutations(candidates, len(expected)),
               key=lambda combo: sum(agreement(w, g) for w, g in zip(expected, combo)))
    return list(best)


match_objects = _match  # public name: editing evaluation pairs target records with detected objects too


def score_caption_faithfulness(image: torch.Tensor | Image.Image | np.ndarray,
                               objects_expected: Sequence[dict[str, Any]],
                               relation: str | None = None) -> dict[str, Any]:
    """Per-attribute accuracy of ``image`` against the scene its caption describes.

    ``position`` is the cell match for one object or the relation for two (inferred from
    the stored x/y when ``relation`` is None; 1.0 when the scene does not constrain it).
    ``all_correct`` also requires the number of detected objects to match.
    """
    expected = [dict(obj) for obj in objects_expected]
    if not expected:
        raise ValueError("objects_expected is empty")
    detected = parse_shapes_image(image)
    matched = _match(expected, detected)
    result: dict[str, Any] = {}
    for attribute in ("shape", "colour", "size"):
        hits = [got is not None and getattr(got, attribute) == want[attribute]
                for want, got in zip(expected, matched)]
        result[attribute] = sum(hits) / len(expected)
    result["position"] = float(_position_ok(expected, matched, relation))
    result["count"] = float(len(detected) == len(expected))
    # The plainest test of a generated image: a white background, and its largest blobs in the
    # prompted colours (not the best of many spurious blobs, which the attribute scores allow).
    largest = sorted(obj.colour for obj in detected[: len(expected)])
    result["white_background"] = float(white_fraction(image) >= WHITE_BACKGROUND_MIN)
    result["colour_on_white"] = float(result["white_background"] == 1.0 and
                                      largest == sorted(obj["colour"] for obj in expected))
    result["n_detected"] = len(detected)
    result["all_correct"] = all(result[key] == 1.0 for key in
                                ("shape", "colour", "size", "position", "count"))
    return result


def _position_ok(expected: list[dict[str, Any]], matched: list[DetectedObject | None],
                 relation: str | None) -> bool:
    if any(got is None for got in matched):
        return False
    if len(expected) == 1:
        want = expected[0]
        if "x" not in want or "y" not in want:
            return True
        return cell_of(matched[0].x, matched[0].y) == cell_of(want["x"], want["y"])
    if len(expected) == 2:
        if not relation:
            if not all("x" in obj and "y" in obj for obj in expected):
                return True
            relation = infer_relation(expected)
        return relation_holds(matched[0], matched[1], relation)
    return True


_OBJECT = (rf"an? (?P<size{{n}}>{'|'.join(SIZES)}) (?P<colour{{n}}>{'|'.join(COLOURS)}) "
           rf"(?P<shape{{n}}>{'|'.join(SHAPES)})")
_PAIR = re.compile(_OBJECT.format(n=0) + rf" (?P<relation>{'|'.join(RELATIONS)}) "
                   + _OBJECT.format(n=1) + "$")
_SINGLE = re.compile(_OBJECT.format(n=0) + r"(?: (?P<where>.+))?$")


def parse_shapes_caption(text: str) -> tuple[list[dict[str, Any]], str]:
    """Invert :func:`lmfusion.data.shapes.caption_for`: ``(objects, relation)``.

    Lets an evaluation score images generated from free-standing prompts.  Single objects
    get the x/y of their cell; pairs get no positions (the relation carries them).
    """
    text = text.strip().lower().rstrip(".")
    take = lambda match, n: {key: match[f"{key}{n}"] for key in ("shape", "colour", "size")}  # noqa: E731
    pair = _PAIR.match(text)
    if pair:
        return [take(pair, 0), take(pair, 1)], pair["relation"]
    single = _SINGLE.match(text)
    cells = {phrase: cell for cell, phrase in CELL_PHRASES.items()}
    if single and (single["where"] or "") in cells:
        x, y = cell_centre(*cells[single["where"] or ""])
        return [{**take(single, 0), "x": x, "y": y}], ""
    raise ValueError(f"not a shapes caption: {text!r}")
