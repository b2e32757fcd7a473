"""A procedurally generated "shapes" caption dataset for fast, checkable experiments.

Each image holds one or two flat-coloured shapes on white, and its caption fully pins
down what is drawn ("a small red circle", "a large blue square on the left", "a small
red circle above a large blue square").  Because the structured scene is stored next to
the caption, :mod:`lmfusion.data.shapes_oracle` can score whether a *generated* image
matches its prompt, which no photo dataset allows at this scale.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .formats import ImageFolderWriter

SHAPES = ("circle", "square", "triangle")
# Chosen far apart in RGB (and from white) so that colour survives blur and compression.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 25),
    "green": (30, 160, 50),
    "blue": (30, 80, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 170),
    "orange": (255, 140, 0),
}
# Half-extent of a shape as a fraction of the image side.  A large shape still fits in
# one cell of the 3x3 grid, so shapes in different cells never touch.
SIZES: dict[str, float] = {"small": 0.08, "large": 0.14}
GRID = 3
BACKGROUND = (255, 255, 255)
RELATIONS = ("above", "below", "to the left of", "to the right of")
CELL_PHRASES: dict[tuple[int, int], str] = {
    (0, 0): "in the top left", (1, 0): "at the top", (2, 0): "in the top right",
    (0, 1): "on the left", (1, 1): "", (2, 1): "on the right",
    (0, 2): "in the bottom left", (1, 2): "at the bottom", (2, 2): "in the bottom right",
}
CENTRE_CELL = (1, 1)


def cell_centre(col: int, row: int) -> tuple[float, float]:
    """Normalised (x, y) centre of a grid cell; (0, 0) is the top-left corner of the image."""
    return (col + 0.5) / GRID, (row + 0.5) / GRID


def cell_of(x: float, y: float) -> tuple[int, int]:
    """Grid cell (col, row) containing the normalised point (x, y)."""
    clamp = lambda value: min(GRID - 1, max(0, int(value * GRID)))  # noqa: E731
    return clamp(x), clamp(y)


def describe_object(obj: dict[str, Any]) -> str:
    """``"a small red circle"``."""
    return f"a {obj['size']} {obj['colour']} {obj['shape']}"


def caption_for(objects: Sequence[dict[str, Any]], relation: str = "") -> str:
    """Caption of a scene: one object plus its cell, or ``subject <relation> object``.

    A lone shape in the centre cell gets no position phrase, so every caption still
    determines the layout.
    """
    if len(objects) == 1:
        phrase = CELL_PHRASES[cell_of(objects[0]["x"], objects[0]["y"])]
        return describe_object(objects[0]) + (f" {phrase}" if phrase else "")
    if len(objects) == 2 and relation in RELATIONS:
        return f"{describe_object(objects[0])} {relation} {describe_object(objects[1])}"
    raise ValueError(f"cannot caption {len(objects)} objects with relation {relation!r}")


def _random_object(rng: np.random.Generator) -> dict[str, Any]:
    return {"shape": SHAPES[rng.integers(len(SHAPES))],
            "colour": list(COLOURS)[rng.integers(len(COLOURS))],
            "size": list(SIZES)[rng.integers(len(SIZES))]}


def _place(obj: dict[str, Any], cell: tuple[int, int], rng: np.random.Generator,
           jitter: float) -> dict[str, Any]:
    """Centre ``obj`` in ``cell``, moved by up to ``jitter`` of the room it has there."""
    room = 1.0 / (2 * GRID) - SIZES[obj["size"]]
    x, y = cell_centre(*cell)
    dx, dy = rng.uniform(-1.0, 1.0, size=2) * room * jitter
    return {**obj, "x": round(float(x + dx), 4), "y": round(float(y + dy), 4)}


def _pair_cells(relation: str, rng: np.random.Generator) -> tuple[tuple[int, int], tuple[int, int]]:
    """Cells for (subject, object) on one row/column so the relation is unambiguous."""
    line = int(rng.integers(GRID))
    first, second = [(0, 1), (1, 2), (0, 2)][rng.integers(3)]
    if relation in ("below", "to the right of"):
        first, second = second, first
    if relation in ("above", "below"):
        return (line, first), (line, second)
    return (first, line), (second, line)


def sample_scene(rng: np.random.Generator, two_object_prob: float = 0.5,
                 jitter: float = 0.5) -> tuple[list[dict[str, Any]], str]:
    """Random scene: ``(objects, relation)``; relation is ``""`` for a single object.

    Two objects never share both shape and colour, so each is named unambiguously.
    ``jitter`` (0..1) is capped so that a shape never leaves its grid cell.
    """
    if not (0.0 <= jitter <= 1.0 and 0.0 <= two_object_prob <= 1.0):
        raise ValueError(f"jitter and two_object_prob must be in [0, 1], got {jitter}, {two_object_prob}")
    if rng.random() >= two_object_prob:
        cell = (int(rng.integers(GRID)), int(rng.integers(GRID)))
        return [_place(_random_object(rng), cell, rng, jitter)], ""
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    subject = _random_object(rng)
    other = _random_object(rng)
    while (other["shape"], other["colour"]) == (subject["shape"], subject["colour"]):
        other = _random_object(rng)
    cells = _pair_cells(relation, rng)
    return [_place(subject, cells[0], rng, jitter), _place(other, cells[1], rng, jitter)], relation


def _draw(draw: ImageDraw.ImageDraw, obj: dict[str, Any], side: int) -> None:
    cx, cy = obj["x"] * side, obj["y"] * side
    half = SIZES[obj["size"]] * side
    colour = COLOURS[obj["colour"]]
    if obj["shape"] == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=colour)
    elif obj["shape"] == "square":
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=colour)
    elif obj["shape"] == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=colour)
    else:
        raise ValueError(f"unknown shape {obj['shape']!r}")


def render_scene(objects: Sequence[dict[str, Any]], size: int = 64,
                 supersample: int = 4) -> Image.Image:
    """Draw the scene at ``supersample`` x resolution and box-filter down (clean antialiasing)."""
    side = size * supersample
    canvas = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        _draw(draw, obj, side)
    return canvas.resize((size, size), Image.Resampling.BOX) if supersample > 1 else canvas


def scene_for_index(seed: int, index: int, two_object_prob: float = 0.5,
                    jitter: float = 0.5) -> tuple[list[dict[str, Any]], str]:
    """The scene of image ``index``; seeded per index so it does not depend on ``n``."""
    return sample_scene(np.random.default_rng([seed, index]), two_object_prob, jitter)


def _test_indices(n: int, seed: int, test_fraction: float) -> set[int]:
    """A seeded random ``test_fraction`` of the indices (at least one when possible)."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n_test = int(round(n * test_fraction))
    if test_fraction > 0 and n >= 2:
        n_test = max(1, n_test)
    order = np.random.default_rng([seed, 2**31 - 1]).permutation(n)
    return set(order[:n_test].tolist())


def generate_shapes_dataset(out_dir: str | os.PathLike, n: int, size: int = 64, seed: int = 0,
                            progress: bool = True, *, split: bool = False,
                            test_fraction: float = 0.05, overwrite: bool = False,
                            two_object_prob: float = 0.5, jitter: float = 0.5) -> Path:
    """Write ``n`` shapes images as an HF ``imagefolder`` (``metadata.jsonl`` per folder).

    Rows carry ``file_name``, ``text``, ``objects`` (shape, colour, size, x, y),
    ``relation`` and the scene ``index``.  With ``split=True`` the images go to
    ``train/`` and ``test/``.  Output is byte-for-byte deterministic in ``seed``, and
    written atomically (refuses a non-empty ``out_dir`` unless ``overwrite``).
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    test = _test_indices(n, seed, test_fraction) if split else set()
    with ImageFolderWriter(out_dir, overwrite=overwrite) as writer:
        for index in tqdm(range(n), desc="shapes", unit="img", disable=not progress):
            objects, relation = scene_for_index(seed, index, two_object_prob, jitter)
            where = ("test" if index in test else "train") if split else ""
            writer.add(render_scene(objects, size), caption_for(objects, relation), split=where,
                       objects=objects, relation=relation, index=index)
    return Path(out_dir)
