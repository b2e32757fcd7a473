"""Shapes editing triples: a scene, an instruction, and the scene re-rendered after the edit.

The target is drawn from the edited object records by the same renderer as the source, so the
ground truth is exact, and both object lists are stored with each row: the shapes oracle can
then score an edited image attribute by attribute (lmfusion.evaluation.edit).

Edit types: recolour, resize (small <-> large), move (one grid cell left/right/up/down),
reshape, add an object (one object -> two) and remove one (two -> one). Each type has several
phrasings for training and others kept for the test split, and some (shape, colour) results of
an edit are never produced in training: the test split asks for those, to see whether a model
composes an edit or memorised its pairs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .edits import EDITS_FILE
from .shapes import CELL_PHRASES, COLOURS, GRID, SHAPES, SIZES, caption_for, cell_centre, cell_of, render_scene
from .shapes import _place, _random_object, sample_scene
from .shapes_oracle import infer_relation
from .split_writer import check_split_args, write_splits

EDIT_TYPES = ("recolour", "resize", "move", "reshape", "add", "remove")
_EDIT_SALT = 0xED17
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

# {ref} names the edited object ("the red circle"); {value} the new colour, shape, size word,
# direction, or the added object with its place ("a small blue square on the left").
PHRASES: dict[str, list[str]] = {
    "recolour": ["make {ref} {value}", "change the colour of {ref} to {value}", "paint {ref} {value}",
                 "turn {ref} {value}"],
    "resize": ["make {ref} {value}", "change {ref} to {value}", "resize {ref} to {value}"],
    "move": ["move {ref} {value}", "move {ref} one cell {value}", "shift {ref} {value}"],
    "reshape": ["make {ref} a {value}", "turn {ref} into a {value}", "change {ref} into a {value}"],
    "add": ["add {value}", "draw {value}", "put {value}"],
    "remove": ["remove {ref}", "delete {ref}", "take away {ref}"],
}
HELDOUT_PHRASES: dict[str, list[str]] = {
    "recolour": ["recolour {ref} in {value}", "{ref} should be {value}"],
    "resize": ["{ref} should be {value}", "scale {ref} to {value}"],
    "move": ["nudge {ref} {value}", "{ref} goes one step {value}"],
    "reshape": ["reshape {ref} into a {value}", "{ref} should become a {value}"],
    "add": ["place {value}", "insert {value}"],
    "remove": ["erase {ref}", "get rid of {ref}"],
}
# (shape, colour) of the edited object after the edit that training never shows.
HELDOUT_RESULTS = frozenset({("triangle", "purple"), ("square", "orange"), ("circle", "green")})


def _ref(obj: dict) -> str:
    """Colour + shape is unique in a scene (sample_scene never repeats the pair)."""
    return f"the {obj['colour']} {obj['shape']}"


def _where(obj: dict) -> str:
    return CELL_PHRASES[cell_of(obj["x"], obj["y"])] or "in the centre"


def _caption(objects: list[dict]) -> str:
    return caption_for(objects) if len(objects) == 1 else caption_for(objects, infer_relation(objects))


def _offset_in(obj: dict, cell: tuple[int, int], size: str) -> dict:
    """obj moved to `cell` (keeping its offset from the cell centre, clamped to the room a shape of
    `size` has there, so that it never leaves its cell)."""
    old_x, old_y = cell_centre(*cell_of(obj["x"], obj["y"]))
    room = 1.0 / (2 * GRID) - SIZES[size]
    dx, dy = [float(np.clip(d, -room, room)) for d in (obj["x"] - old_x, obj["y"] - old_y)]
    x, y = cell_centre(*cell)
    return {**obj, "size": size, "x": round(x + dx, 4), "y": round(y + dy, 4)}


def propose_edit(kind: str, rng: np.random.Generator, jitter: float = 0.5):
    """(source objects, target objects, edited index, value text) for one edit, or None when the
    drawn scene does not allow it (an object at the grid's edge cannot move further)."""
    if kind == "add":
        source, _ = sample_scene(rng, 0.0, jitter)
    elif kind == "remove":
        source, _ = sample_scene(rng, 1.0, jitter)
    else:
        source, _ = sample_scene(rng, 0.5, jitter)
    index = int(rng.integers(len(source)))
    obj, others = source[index] if kind != "add" else None, [o for i, o in enumerate(source) if i != index]
    taken = {(o["shape"], o["colour"]) for o in others}
    target = [dict(o) for o in source]
    if kind == "recolour":
        colours = [c for c in COLOURS if c != obj["colour"] and (obj["shape"], c) not in taken]
        colour = colours[rng.integers(len(colours))]
        target[index]["colour"], value = colour, colour
    elif kind == "resize":
        size = "large" if obj["size"] == "small" else "small"
        target[index] = _offset_in(obj, cell_of(obj["x"], obj["y"]), size)
        value = size
    elif kind == "reshape":
        shapes = [s for s in SHAPES if s != obj["shape"] and (s, obj["colour"]) not in taken]
        shape = shapes[rng.integers(len(shapes))]
        target[index]["shape"], value = shape, shape
    elif kind == "move":
        value = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        col, row = cell_of(obj["x"], obj["y"])
        cell = (col + DIRECTIONS[value][0], row + DIRECTIONS[value][1])
        if not (0 <= cell[0] < GRID and 0 <= cell[1] < GRID) or any(cell_of(o["x"], o["y"]) == cell for o in others):
            return None
        target[index] = _offset_in(obj, cell, obj["size"])
    elif kind == "add":
        new = _random_object(rng)
        if (new["shape"], new["colour"]) == (source[0]["shape"], source[0]["colour"]):
            return None
        free = [(c, r) for c in range(GRID) for r in range(GRID) if (c, r) != cell_of(source[0]["x"], source[0]["y"])]
        new = _place(new, free[rng.integers(len(free))], rng, jitter)
        target = [dict(source[0]), new]
        index, value = 1, f"a {new['size']} {new['colour']} {new['shape']} {_where(new)}"
    elif kind == "remove":
        target = [dict(o) for o in others]
        value = ""
    else:
        raise ValueError(f"unknown edit type {kind!r}; choose from {EDIT_TYPES}")
    return source, target, index, value


def make_edit(seed: int, index: int, heldout: bool, jitter: float = 0.5) -> dict[str, Any]:
    """Row `index` of a shapes-edits set; seeded per index so it does not depend on the count.

    Training rows (heldout=False) never use a held-out phrasing or produce a HELDOUT_RESULTS
    object; test rows use a held-out phrasing half the time and ask for a held-out result half
    the time (where the edit type has a result object: all but remove), marked in the row.
    """
    kind = EDIT_TYPES[index % len(EDIT_TYPES)]
    rng = np.random.default_rng([seed, _EDIT_SALT, index])
    unseen_phrasing = heldout and bool(rng.random() < 0.5)
    unseen_result = heldout and kind != "remove" and bool(rng.random() < 0.5)
    while True:
        proposal = propose_edit(kind, rng, jitter)
        if proposal is None:
            continue
        source, target, edited, value = proposal
        if kind != "remove":
            result = (target[edited]["shape"], target[edited]["colour"])
            if (result in HELDOUT_RESULTS) != unseen_result:
                continue
        break
    phrases = (HELDOUT_PHRASES if unseen_phrasing else PHRASES)[kind]
    ref = _ref(source[edited]) if kind not in ("add",) else ""
    instruction = phrases[rng.integers(len(phrases))].format(ref=ref, value=value)
    return {"instruction": instruction, "edit_type": kind, "edited": edited,
            "source_objects": source, "target_objects": target,
            "source_caption": _caption(source), "target_caption": _caption(target),
            "unseen_phrasing": unseen_phrasing, "unseen_result": unseen_result, "index": index}


def generate_shapes_edits(out_dir: str | os.PathLike, count: int, size: int = 64, seed: int = 0,
                          test_fraction: float = 0.1, progress: bool = True, overwrite: bool = False) -> Path:
    """Write `count` triples: ``train/`` and ``test/`` folders of edits.jsonl + images/.

    The last round(count * test_fraction) indices form the test split (held-out phrasings and
    results, see make_edit). Written to a staging folder and published whole, so an
    interrupted run leaves nothing that looks complete.
    """
    out = check_split_args(count, test_fraction, out_dir, overwrite)

    def write_row(index: int, split: str, folder: Path) -> dict:
        row = make_edit(seed, index, heldout=split == "test")
        for role in ("source", "target"):
            name = f"images/{index:06d}_{role}.png"
            render_scene(row[f"{role}_objects"], size).save(folder / name, format="PNG")
            row[role] = name
        return row

    return write_splits(out, count, test_fraction, EDITS_FILE, write_row, desc="shapes edits", unit="edit",
                        progress=progress)
