"""`lmfusion eval --task chat`: does the model draw when asked, and only then?

On the test split of `lmfusion data shapes-chat`, every user turn is rendered as in training and
answered greedily with BOI allowed (the interleaved sampler, as `lmfusion chat` and the server):

    boi_f1           F1 of "drew at least one image" against "was asked to draw", per phrasing group
                     (training phrasings on new scenes, unseen phrasings, unseen paraphrases); each
                     group's positives are its drawing requests, its negatives every text question
    false_draw_rate  share of text questions answered with an image
    false_draw_freeform  the same on hand-written questions no template writes (chat_freeform.txt),
                     many naming a colour or a shape; kept apart from the F1's negatives
    image_count      share of drawing requests answered with exactly the asked number of images
                     (1 for "draw X", 2 for "draw X, then edit it"), per kind and overall
    image_right      per requested image, whether the shapes oracle reads back the asked object
                     (shape, colour, size and grid cell on a white background); an image not drawn
                     scores 0, so this is not inflated by drawing less
    text_identical   share of text questions whose reply equals the base model's own greedy reply
                     on the same prompt ids (the base vocabulary alone, lmfusion.sampling.text)
"""

from __future__ import annotations

import dataclasses
import json
import time
from importlib import resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from ..data.shapes import cell_of
from ..data.shapes_chat import find_chat_file, read_chat_rows, render_user_turn, user_turn_ids
from ..data.shapes_oracle import WHITE_BACKGROUND_MIN, match_objects, parse_shapes_image, white_fraction
from ..utils import atomic_write_bytes

GROUPS = ("seen", "unseen_phrasing", "unseen_paraphrase")
FREEFORM = "freeform"  # the phrasing of the hand-written text questions


def freeform_questions() -> list[str]:
    """The hand-written held-out text questions shipped with lmfusion (one per line, # comments)."""
    text = resources.files(__package__).joinpath("chat_freeform.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@dataclass
class ChatEvalSettings:
    n: int = 150  # test rows (the first n: the three kinds in turn)
    steps: int = 20
    guidance_scale: float = 3.0
    max_new_tokens: int = 48  # per reply; shapes-chat's base replies are this long at most by default
    max_images: int = 3  # more than any request asks, so over-drawing is counted, not prevented
    seed: int = 0
    base_model: str | None = None
    freeform: bool = True  # also ask the hand-written text questions of chat_freeform.txt
    draw_decision: str = "mass"  # greedy: draw when p(BOI) > 1/2 ("mass") or BOI is the top token ("token")

    def __post_init__(self) -> None:
        if self.n < 1 or self.steps < 1 or self.max_new_tokens < 1 or self.max_images < 1:
            raise ValueError("n, steps, max_new_tokens and max_images must be positive")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (1 = none), got {self.guidance_scale}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------- scoring
def image_matches(image, objects: list[dict]) -> bool:
    """The oracle reads `objects` back from `image`: every attribute of each, on a white background."""
    if white_fraction(image) < WHITE_BACKGROUND_MIN:
        return False
    detected = parse_shapes_image(image)
    if len(detected) != len(objects):
        return False
    for want, got in zip(objects, match_objects(objects, detected)):
        if got is None or (got.shape, got.colour, got.size, cell_of(got.x, got.y)) != (
                want["shape"], want["colour"], want["size"], cell_of(want["x"], want["y"])):
            return False
    return True


def f1(true_pos: int, false_pos: int, false_neg: int) -> float:
    """F1 of the positive class; 0 when there is nothing to be right about."""
    denominator = 2 * true_pos + false_pos + false_neg
    return 2 * true_pos / denominator if denominator else 0.0


def chat_metrics(outcomes: list[dict]) -> dict[str, Any]:
    """The report's figures from per-row outcomes, each {"kind", "phrasing", "drawn" (images
    drawn), "image_right" (a list of 0/1, one per requested image; draw rows), "identical" (text
    rows)}. Pure, so hand-made cases test it."""
    freeform = [o for o in outcomes if o["kind"] == "text" and o["phrasing"] == FREEFORM]
    text = [o for o in outcomes if o["kind"] == "text" and o["phrasing"] != FREEFORM]
    draws = [o for o in outcomes if o["kind"] != "text"]
    false_pos = sum(o["drawn"] > 0 for o in text)
    result: dict[str, Any] = {"n": {"text": len(text), "draw": sum(o["kind"] == "draw" for o in draws),
                                    "draw_edit": sum(o["kind"] == "draw_edit" for o in draws)}}
    result["boi_f1"] = {}
    for group in ("all", *GROUPS):
        members = [o for o in draws if group == "all" or o["phrasing"] == group]
        if members:
            hits = sum(o["drawn"] > 0 for o in members)
            result["boi_f1"][group] = {"f1": f1(hits, false_pos, len(members) - hits), "n_draw": len(members)}
    result["false_draw_rate"] = false_pos / len(text) if text else None
    asked = {"draw": 1, "draw_edit": 2}
    result["image_count"] = {}
    for kind in ("all", "draw", "draw_edit"):
        members = [o for o in draws if kind == "all" or o["kind"] == kind]
        if members:
            result["image_count"][kind] = sum(o["drawn"] == asked[o["kind"]] for o in members) / len(members)
    result["image_right"] = {}
    for kind, position in (("draw", 0), ("draw_edit", 0), ("draw_edit", 1)):
        scores = [o["image_right"][position] for o in draws if o["kind"] == kind]
        if scores:
            result["image_right"][f"{kind} image {position + 1}"] = sum(scores) / len(scores)
    result["text_identical"] = sum(bool(o["identical"]) for o in text) / len(text) if text else None
    if freeform:
        result["n"]["freeform"] = len(freeform)
        result["false_draw_freeform"] = sum(o["drawn"] > 0 for o in freeform) / len(freeform)
        result["text_identical_freeform"] = sum(bool(o["identical"]) for o in freeform) / len(freeform)
    return result


# ---------------------------------------------------------------------- running
def load_chat_test(data: str | Path, n: int) -> tuple[Path, list[dict]]:
    """The first n rows of DATA/test/chat.jsonl (else DATA/chat.jsonl) and their folder."""
    path = find_chat_file(data, "test")
    if path is None:
        raise FileNotFoundError(f"no chat.jsonl in {data}/test or {data} (make one with `lmfusion data shapes-chat`)")
    return path.parent, read_chat_rows(path)[:n]


def answer_row(pipe, row: dict, settings: ChatEvalSettings, seed: int) -> tuple[dict, list]:
    """One row answered greedily with BOI allowed: its outcome and the reply's parts."""
    from ..sampling.text import generate_text_ids

    model = pipe.model
    session = pipe.chat(max_new_tokens=settings.max_new_tokens, max_images=settings.max_images, temperature=0.0,
                        seed=seed, steps=settings.steps, guidance_scale=settings.guidance_scale, progress=False,
                        draw_decision=settings.draw_decision)
    parts = session.send(render_user_turn(model.tokenizer, row["user"]))
    images = [p for p in parts if not isinstance(p, str)]
    outcome = {"kind": row["kind"], "phrasing": row.get("phrasing", "seen"), "drawn": len(images)}
    if row["kind"] == "text":
        base = generate_text_ids(model, user_turn_ids(model.tokenizer, row["user"]), settings.max_new_tokens)
        reply = "".join(p for p in parts if isinstance(p, str))
        outcome["identical"] = not images and reply == model.tokenizer.decode(base, skip_special_tokens=True)
    else:
        outcome["image_right"] = [float(k < len(images) and image_matches(images[k], objects))
                                  for k, objects in enumerate(row["objects"])]
    return outcome, parts


def evaluate_chat(checkpoint, data, out=None, settings: ChatEvalSettings | None = None, device: str = "cpu",
                  report: Callable[[str], None] = print, pipe=None, progress: bool = True) -> dict[str, Any]:
    """Answer the test rows, score them and write report.json / report.md / replies.jsonl.
    `pipe`: an already loaded pipeline (tests), else the checkpoint's. `progress`: a bar per turn."""
    from ..model.lmfusion import LMFusionModel
    from ..run_folders import resolve_checkpoint
    from ..sampling.pipeline import LMFusionPipeline
    from .evaluate import default_out_dir, machine_description, weights_fingerprint

    settings = settings or ChatEvalSettings()
    started = time.time()
    fingerprint = None
    if pipe is None:
        model_dir = Path(resolve_checkpoint(checkpoint))
        model = LMFusionModel.from_pretrained(model_dir, base_model=settings.base_model).to(device).eval()
        pipe, fingerprint = LMFusionPipeline(model), weights_fingerprint(model_dir)
        default = default_out_dir(model_dir)
        out = Path(out) if out is not None else default.with_name(default.name + "-chat")
    folder, rows = load_chat_test(data, settings.n)
    if settings.freeform:
        rows += [{"kind": "text", "phrasing": FREEFORM, "user": q, "objects": []} for q in freeform_questions()]
    report(f"[eval] answering {len(rows)} held-out chat turns ({settings.steps} steps per image, "
           f"guidance {settings.guidance_scale:g})")
    outcomes, replies = [], []
    for i, row in enumerate(tqdm(rows, desc="chat turns", unit="turn", disable=not progress)):
        outcome, parts = answer_row(pipe, row, settings, settings.seed + i)
        outcomes.append(outcome)
        replies.append({"user": row["user"], "kind": row["kind"], "phrasing": outcome["phrasing"],
                        "reply": ["[image]" if not isinstance(p, str) else p for p in parts]})
    result = {"task": "chat", "checkpoint": str(checkpoint), "model": fingerprint, "data": str(folder.resolve()),
              "settings": settings.to_dict(), "machine": machine_description(device), "metrics": chat_metrics(outcomes),
              "seconds": round(time.time() - started, 1)}
    if out is not None:
        result["out_dir"] = str(out)
        write_chat_report(Path(out), result, replies)
    report(summary_line(result))
    return result


# ---------------------------------------------------------------------- report
def summary_line(result: dict) -> str:
    m = result["metrics"]
    f1s = " ".join(f"{g} {v['f1']:.3f}" for g, v in m["boi_f1"].items())
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    return (f"[eval] chat | BOI F1 {f1s} | false draws {fmt(m['false_draw_rate'])} (hand-written "
            f"{fmt(m.get('false_draw_freeform'))}) | image count {fmt(m['image_count'].get('all'))} | text identical "
            f"{fmt(m['text_identical'])}")


def markdown(result: dict) -> str:
    m, s = result["metrics"], result["settings"]
    lines = [f"# Chat evaluation of {result['checkpoint']}", "",
             f"{m['n']['draw']} one-image requests, {m['n']['draw_edit']} two-image requests and {m['n']['text']} text "
             f"questions from {result['data']}; greedy, {s['max_new_tokens']} new tokens, {s['steps']} steps per image, "
             f"guidance {s['guidance_scale']:g}; {result['seconds']} s on {result['machine']['device']}.", "",
             "| metric | group | value |", "|---|---|---|"]
    lines += [f"| BOI F1 | {g} (n draw {v['n_draw']}) | {v['f1']:.3f} |" for g, v in m["boi_f1"].items()]
    if m["false_draw_rate"] is not None:
        lines.append(f"| false-draw rate | text questions | {m['false_draw_rate']:.3f} |")
    lines += [f"| image count right | {k} | {v:.3f} |" for k, v in m["image_count"].items()]
    lines += [f"| image right (oracle) | {k} | {v:.3f} |" for k, v in m["image_right"].items()]
    if m["text_identical"] is not None:
        lines.append(f"| text reply = base's | text questions | {m['text_identical']:.3f} |")
    if m.get("false_draw_freeform") is not None:
        lines.append(f"| false-draw rate | hand-written questions (n {m['n']['freeform']}) | "
                     f"{m['false_draw_freeform']:.3f} |")
        lines.append(f"| text reply = base's | hand-written questions | {m['text_identical_freeform']:.3f} |")
    return "\n".join(lines) + "\n\nEvery reply: `replies.jsonl`.\n"


def write_chat_report(out_dir: Path, result: dict, replies: list[dict]) -> None:
    """replies.jsonl and report.md first, report.json last: its presence means the evaluation finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "replies.jsonl").write_text("".join(json.dumps(r) + "\n" for r in replies), encoding="utf-8")
    (out_dir / "report.md").write_text(markdown(result), encoding="utf-8")
    atomic_write_bytes(out_dir / "report.json", (json.dumps(result, indent=1) + "\n").encode())
