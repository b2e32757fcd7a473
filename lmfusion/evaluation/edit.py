"""`lmfusion eval --task edit`: edits of held-out shapes triples, scored exactly by the shapes oracle.

Each test row stores its source and target object records, so an edited image is read back into
objects and compared with the target, per edit type:

    success       the edited attribute is right (recolour: the colour; resize: the size; move: the
                  grid cell; reshape: the shape; add: the new object, every attribute; remove:
                  the removed object is gone)
    preservation  everything else is unchanged: every other attribute of the edited object, every
                  other object, and the object count
    joint         both at once
    l1            mean absolute pixel difference to the true target, in [0, 1]

Two baselines bracket the model: copying the source (preserves everything, edits nothing) and
generating from the target's caption alone (knows the answer, not the picture it edits).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..data.edits import find_edits_file, read_edit_records
from ..data.images import save_image_grid
from ..data.shapes import cell_of
from ..data.shapes_edits import EDIT_TYPES
from ..data.shapes_oracle import WHITE_BACKGROUND_MIN, match_objects, parse_shapes_image, white_fraction
from ..diffusion import DEFAULT_IMAGE_GUIDANCE_SCALE
from ..sampling.image import check_strength
from ..utils import atomic_write_bytes
from .generation import generate_images

ATTRIBUTES = ("shape", "colour", "size", "cell")
EDITED_ATTRIBUTE = {"recolour": "colour", "resize": "size", "move": "cell", "reshape": "shape"}


@dataclass
class EditEvalSettings:
    n: int = 60  # test triples (the first n of the test split: all edit types in turn)
    steps: int = 20
    guidance_scale: float = 3.0  # s_T, on the instruction
    image_guidance_scales: list[float] = field(default_factory=lambda: [DEFAULT_IMAGE_GUIDANCE_SCALE])  # s_I, each run
    scheduler: str | None = None
    seed: int = 0
    batch_size: int = 16
    baselines: bool = True
    base_model: str | None = None
    strength: float = 1.0  # < 1: start each edit from its source noised part of the way (SDEdit)

    def __post_init__(self) -> None:
        if self.n < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("n, steps and batch_size must be positive")
        check_strength(self.strength)
        if self.guidance_scale < 0 or not self.image_guidance_scales or min(self.image_guidance_scales) < 0:
            raise ValueError("guidance scales must be >= 0 (1 = none), with at least one image guidance scale")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------- scoring
def _attributes(obj) -> dict[str, Any]:
    get = (lambda k: obj[k]) if isinstance(obj, dict) else (lambda k: getattr(obj, k))  # noqa: E731
    return {"shape": get("shape"), "colour": get("colour"), "size": get("size"), "cell": cell_of(get("x"), get("y"))}


LOST_REASONS = ("background", "count", "missing", *ATTRIBUTES)  # what preservation can fail on, in report order


def judge_edit(image, row: dict) -> tuple[bool, tuple[str, ...]]:
    """(success, lost) of one edited image against its row's target records.

    `lost` names what preservation failed on, from LOST_REASONS: no white background, a wrong
    object count, an expected object not found, or an attribute of a kept object that changed.
    Preservation holds exactly when it is empty.

    Both need a shapes picture: a white background, and objects read from the largest blobs only
    (as many as the target has). Otherwise a noisy image, full of small blobs of every colour,
    would "succeed" at any recolour by offering one blob of the asked colour.
    """
    detected = parse_shapes_image(image)
    target, kind, edited = row["target_objects"], row["edit_type"], row["edited"]
    if white_fraction(image) < WHITE_BACKGROUND_MIN:
        return False, ("background",)
    matched = match_objects(target, detected[: len(target)])
    got = [None if m is None else _attributes(m) for m in matched]
    want = [_attributes(o) for o in target]
    same = lambda i, keys: got[i] is not None and all(got[i][k] == want[i][k] for k in keys)  # noqa: E731
    if kind == "remove":
        gone = _attributes(row["source_objects"][edited])
        success = not any((d.shape, d.colour) == (gone["shape"], gone["colour"]) for d in detected)
        kept = {i: ATTRIBUTES for i in range(len(target))}
    elif kind == "add":
        success = same(edited, ATTRIBUTES)
        kept = {i: ATTRIBUTES for i in range(len(target)) if i != edited}
    else:
        attribute = EDITED_ATTRIBUTE[kind]
        success = same(edited, [attribute])
        kept = {i: ATTRIBUTES for i in range(len(target)) if i != edited}
        kept[edited] = tuple(a for a in ATTRIBUTES if a != attribute)  # the edited object's other attributes
    lost = {"count"} if len(detected) != len(target) else set()
    for i, keys in kept.items():
        lost |= {"missing"} if got[i] is None else {k for k in keys if got[i][k] != want[i][k]}
    return success, tuple(r for r in LOST_REASONS if r in lost)


def _as_numbers(success: bool, lost: tuple[str, ...]) -> dict[str, float]:
    return {"success": float(success), "preservation": float(not lost), "joint": float(success and not lost)}


def score_edit(image, row: dict) -> dict[str, float]:
    """success / preservation / joint of one edited image (judge_edit as numbers)."""
    return _as_numbers(*judge_edit(image, row))


def summarise(scores: list[dict], rows: list[dict]) -> dict[str, dict]:
    """Means per edit type, overall, and for the test rows with unseen phrasings or unseen results.

    A score's "lost" (a tuple of reasons) becomes "lost": {reason: share of the group's triples}."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for score, row in zip(scores, rows):
        groups[row["edit_type"]].append(score)
        groups["overall"].append(score)
        for flag in ("unseen_phrasing", "unseen_result"):
            if row.get(flag):
                groups[flag].append(score)
    order = ["overall", *EDIT_TYPES, "unseen_phrasing", "unseen_result"]  # a fixed column order for reports
    summary = {}
    for name in (g for g in order if groups.get(g)):
        members = groups[name]
        means = {k: sum(s[k] for s in members) / len(members) for k in members[0] if k != "lost"}
        if "lost" in members[0]:
            means["lost"] = {r: sum(r in s["lost"] for s in members) / len(members) for r in LOST_REASONS}
        summary[name] = {**means, "n": len(members)}
    return summary


def score_images(images: torch.Tensor, targets: torch.Tensor, rows: list[dict]) -> dict[str, dict]:
    scores = []
    for image, target, row in zip(images, targets, rows):
        success, lost = judge_edit(image, row)
        scores.append({**_as_numbers(success, lost), "l1": float((image - target).abs().mean()), "lost": lost})
    return summarise(scores, rows)


# ---------------------------------------------------------------------- running
def load_edit_test(data: str | Path, size: int, n: int):
    """The first n triples of DATA/test (else of DATA itself), with their object records."""
    folder = Path(data) / "test" if find_edits_file(Path(data) / "test") is not None else Path(data)
    if find_edits_file(folder) is None:
        raise FileNotFoundError(f"no edits.jsonl in {data}/test or {data} (make one with `lmfusion data shapes-edits`)")
    records = read_edit_records(folder, size, n)
    rows = [r.meta for r in records]
    if not all("target_objects" in row and "edit_type" in row for row in rows):
        raise ValueError(f"{folder}: rows lack target_objects/edit_type; scoring needs shapes-edits records")
    return (torch.stack([r.source for r in records]), torch.stack([r.target for r in records]),
            [r.instruction for r in records], rows)


def edit_all(pipe, sources, instructions, settings: EditEvalSettings, image_guidance_scale: float,
             progress: bool = False) -> torch.Tensor:
    """One edit per source, image i seeded with seed + i, in chunks of batch_size."""
    out = []
    starts = range(0, len(sources), settings.batch_size)
    bar = tqdm(starts, desc=f"edits, image guidance {image_guidance_scale:g}", unit="batch", disable=not progress)
    for start in bar:
        chunk = slice(start, start + settings.batch_size)
        seeds = [settings.seed + i for i in range(start, min(start + settings.batch_size, len(sources)))]
        out.append(pipe.edit(sources[chunk], instructions[chunk], settings.guidance_scale, image_guidance_scale,
                             settings.steps, seeds, settings.scheduler, output="tensor", progress=False,
                             strength=settings.strength))
    return torch.cat(out)


def evaluate_edits(checkpoint, data, out=None, settings: EditEvalSettings | None = None, device: str = "cpu",
                   report: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Edit the test triples at each image guidance scale, score them and the baselines; write the report.
    `progress`: a bar per batch of edits."""
    from ..model.lmfusion import LMFusionModel
    from ..run_folders import resolve_checkpoint
    from ..sampling.pipeline import LMFusionPipeline
    from .evaluate import default_out_dir, machine_description, weights_fingerprint

    settings = settings or EditEvalSettings()
    model_dir = Path(resolve_checkpoint(checkpoint))
    default = default_out_dir(model_dir)
    out_dir = Path(out) if out is not None else default.with_name(default.name + "-edit")
    started = time.time()
    model = LMFusionModel.from_pretrained(model_dir, base_model=settings.base_model).to(device).eval()
    pipe = LMFusionPipeline(model)
    sources, targets, instructions, rows = load_edit_test(data, model.config.image_size, settings.n)
    result: dict[str, Any] = {"task": "edit", "checkpoint": str(checkpoint), "model": weights_fingerprint(model_dir),
                              "data": str(Path(data).resolve()), "settings": settings.to_dict(),
                              "machine": machine_description(device), "methods": {}}
    edited = {}
    for scale in settings.image_guidance_scales:
        name = f"model (image guidance {scale:g}" + (f", strength {settings.strength:g})" if settings.strength < 1 else ")")
        report(f"[eval] editing {len(rows)} test triples ({settings.steps} steps, guidance {settings.guidance_scale:g}, "
               f"image guidance {scale:g})")
        edited[name] = edit_all(pipe, sources, instructions, settings, scale, progress)
    if settings.baselines:
        edited["copy the source"] = sources
        report(f"[eval] baseline: generating {len(rows)} images from the target captions alone")
        edited["target caption alone"] = generate_images(pipe, [row["target_caption"] for row in rows], settings.seed,
                                                         settings.steps, settings.guidance_scale, settings.scheduler,
                                                         settings.batch_size)
    for name, images in edited.items():
        result["methods"][name] = score_images(images, targets, rows)
    result["seconds"] = round(time.time() - started, 1)
    result["out_dir"] = str(out_dir)
    write_edit_report(out_dir, result, sources, targets, edited, instructions)
    report(summary_line(result))
    return result


# ---------------------------------------------------------------------- report
def summary_line(result: dict) -> str:
    parts = [f"{name}: joint {m['overall']['joint']:.3f} L1 {m['overall']['l1']:.3f}" for name, m in result["methods"].items()]
    return "[eval] edit | " + " | ".join(parts)


def markdown(result: dict, instructions: list[str]) -> str:
    settings = result["settings"]
    lines = [f"# Editing evaluation of {result['checkpoint']}", "",
             f"{result['methods'] and next(iter(result['methods'].values()))['overall']['n']} held-out triples of "
             f"{result['data']}; {settings['steps']} steps, text guidance {settings['guidance_scale']:g}, "
             f"seed {settings['seed']}; {result['seconds']} s on {result['machine']['device']} "
             f"({result['machine']['cpu']}, {result['machine']['threads']} threads).", ""]
    groups = list(next(iter(result["methods"].values())))
    for metric in ("joint", "success", "preservation", "l1"):
        lines += [f"## {metric}", "", "| method | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
        for name, scores in result["methods"].items():
            lines.append(f"| {name} | " + " | ".join(f"{scores[g][metric]:.3f}" if g in scores else "" for g in groups) + " |")
        lines.append("")
    lines += ["## what preservation lost", "",
              "Share of triples whose preservation failed on each reason (several can hold at once): no white "
              "background, a wrong object count, an object not found, or a kept object's shape / colour / size / "
              "grid cell changed.", "", "| method | reason | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]
    for name, scores in result["methods"].items():
        for reason in LOST_REASONS:
            lines.append(f"| {name} | {reason} | " + " | ".join(
                f"{scores[g]['lost'][reason]:.3f}" if "lost" in scores.get(g, {}) else "" for g in groups) + " |")
    lines.append("")
    lines += ["`edits.png`: rows of 8 are sources, then each method's images in the order above, then the "
              "true targets. Instructions of the first 8:", ""]
    lines += [f"{i + 1}. {text}" for i, text in enumerate(instructions[:8])]
    return "\n".join(lines) + "\n"


def write_edit_report(out_dir: Path, result: dict, sources, targets, edited: dict, instructions: list[str]) -> None:
    """edits.png and report.md first, report.json last: its presence means the evaluation finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = min(8, len(sources))
    rows = [sources[:shown]] + [images[:shown] for images in edited.values()] + [targets[:shown]]
    save_image_grid(torch.cat(rows), out_dir / "edits.png", nrow=shown)
    (out_dir / "report.md").write_text(markdown(result, instructions), encoding="utf-8")
    atomic_write_bytes(out_dir / "report.json", (json.dumps(result, indent=1) + "\n").encode())
