"""Questions about shapes scenes, with exact answers read from the scene records.

The renderer (lmfusion.data.shapes) stores what it drew, so every question has one right
answer and a VLM's reply can be scored by string equality. The caption is the dataset's own
caption; the short questions ask one attribute of a single-object scene each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from ..data.formats import find_metadata
from ..data.shapes import CELL_PHRASES, caption_for, cell_of, render_scene, scene_for_index

# Question kind -> the question asked. The order is the order of every report.
QUESTIONS: dict[str, str] = {
    "caption": "Describe the image.",
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "size": "Is it small or large?",
    "position": "Where is it?",
}
# Captions leave the centre cell unsaid ("a small red circle"); a "Where is it?" answer
# cannot be empty, so the centre gets its own phrase.
CENTRE_PHRASE = "in the centre"


@dataclass(frozen=True)
class Scene:
    """One shapes image and the records it was drawn from."""

    image: Image.Image
    objects: tuple[dict[str, Any], ...]
    relation: str = ""


def question_kind(question: str) -> str:
    """The kind of a question text (the inverse of QUESTIONS); ValueError for any other text."""
    for kind, text in QUESTIONS.items():
        if question.strip() == text:
            return kind
    raise ValueError(f"unknown question {question!r}; known: {', '.join(repr(q) for q in QUESTIONS.values())}")


def position_phrase(obj: dict[str, Any]) -> str:
    """Where a lone object is, in the words the captions use (CENTRE_PHRASE for the centre)."""
    return CELL_PHRASES[cell_of(obj["x"], obj["y"])] or CENTRE_PHRASE


def answer(kind: str, objects: Sequence[dict[str, Any]], relation: str = "") -> str:
    """The exact answer to question `kind` about a scene of `objects`."""
    if kind not in QUESTIONS:
        raise ValueError(f"unknown question kind {kind!r}; known: {', '.join(QUESTIONS)}")
    if kind == "caption":
        return caption_for(list(objects), relation)
    if len(objects) != 1:
        # "What colour is the shape?" has no single answer when there are two shapes.
        raise ValueError(f"{kind!r} questions need a single-object scene, this one has {len(objects)} objects")
    obj = objects[0]
    return position_phrase(obj) if kind == "position" else str(obj[kind])


def kinds_for(scene: Scene) -> tuple[str, ...]:
    """The question kinds that have an answer for `scene` (two-object scenes: the caption only)."""
    return tuple(QUESTIONS) if len(scene.objects) == 1 else ("caption",)


def generated_scenes(seed: int, count: int, image_size: int = 64, two_object_prob: float = 0.0) -> list[Scene]:
    """Scenes 0..count-1 of shapes seed `seed`, rendered in memory (the same as `lmfusion data shapes`)."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    scenes = []
    for index in range(count):
        objects, relation = scene_for_index(seed, index, two_object_prob)
        scenes.append(Scene(render_scene(objects, image_size), tuple(objects), relation))
    return scenes


def folder_scenes(folder: str | Path, limit: int | None = None) -> list[Scene]:
    """Scenes of a shapes image folder (`lmfusion data shapes --out DIR`: its train/ part if split)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"shapes data folder not found: {folder}")
    metadata = find_metadata(folder / "train") if (folder / "train").is_dir() else find_metadata(folder)
    if metadata is None:
        raise FileNotFoundError(f"no metadata.jsonl in {folder}: write one with `lmfusion data shapes --out {folder}`")
    scenes = []
    with open(metadata, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if not row.get("objects"):
                raise ValueError(f"{metadata} has rows without 'objects': not a shapes dataset")
            with Image.open(metadata.parent / row["file_name"]) as image:
                scenes.append(Scene(image.convert("RGB"), tuple(row["objects"]), row.get("relation", "")))
            if limit is not None and len(scenes) >= limit:
                break
    if not scenes:
        raise ValueError(f"{metadata} lists no images")
    return scenes
