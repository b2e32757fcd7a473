"""Held-out accuracy of a saved VLM folder, run with transformers alone (greedy `generate`).

The folder is loaded with `LlavaForConditionalGeneration.from_pretrained` and
`AutoProcessor.from_pretrained`, as any user of the folder would, so what is measured is the
folder, not lmfusion's training objects. Two blind baselines say what an answerer that does
not look gets: the same VLM shown a blank white image, and the best constant answer (the
held-out set's most common answer to each question).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoProcessor, LlavaForConditionalGeneration, ProcessorMixin

from ..base_models import load_text_model
from ..data.shapes import cell_of
from ..data.shapes_oracle import parse_shapes_caption
from .batches import chat_prompt
from .questions import QUESTIONS, Scene, answer, kinds_for

CAPTION_ATTRIBUTES = ("colour", "shape", "size", "position")
TEXT_PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, a small red circle")


def load_vlm(folder: str | Path) -> tuple[LlavaForConditionalGeneration, ProcessorMixin]:
    """The model and processor of a saved VLM folder, in eval mode."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no VLM folder at {folder} (expected config.json from `lmfusion vlm build --out {folder}`)")
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    # Batched generation continues every prompt from its last token, so pad on the left.
    processor.tokenizer.padding_side = "left"
    return model, processor


@torch.no_grad()
def ask(model: LlavaForConditionalGeneration, processor: ProcessorMixin, images: Sequence[Image.Image],
        question: str, batch_size: int = 16, max_new_tokens: int = 16, progress: bool = False) -> list[str]:
    """Greedy answers to one question about each image."""
    text = chat_prompt(processor, question)
    replies: list[str] = []
    for start in tqdm(range(0, len(images), batch_size), desc=question, disable=not progress):
        chunk = list(images[start : start + batch_size])
        inputs = processor(text=[text] * len(chunk), images=chunk, return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        replies.extend(r.strip() for r in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return replies


def caption_attribute_hits(caption: str, objects: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Which attributes of a single-object scene a caption gets right (all 0 if it does not parse)."""
    try:
        got, _ = parse_shapes_caption(caption)
    except ValueError:
        return {a: 0.0 for a in CAPTION_ATTRIBUTES}
    if len(got) != len(objects) or len(objects) != 1:
        return {a: 0.0 for a in CAPTION_ATTRIBUTES}
    want, got = objects[0], got[0]
    hits = {a: float(got[a] == want[a]) for a in ("colour", "shape", "size")}
    hits["position"] = float(cell_of(got["x"], got["y"]) == cell_of(want["x"], want["y"]))
    return hits


def _accuracy(replies: Sequence[str], references: Sequence[str]) -> float:
    return sum(r == t for r, t in zip(replies, references)) / len(references)


def score_answers(replies: dict[str, list[str]], scenes: Sequence[Scene]) -> dict[str, Any]:
    """Per-question exact-match accuracy, and per-attribute accuracy of the captions."""
    result: dict[str, Any] = {"accuracy": {}}
    for kind, said in replies.items():
        result["accuracy"][kind] = _accuracy(said, [answer(kind, s.objects, s.relation) for s in scenes])
    if "caption" in replies:
        rows = [caption_attribute_hits(c, s.objects) for c, s in zip(replies["caption"], scenes)]
        result["caption_attributes"] = {a: sum(r[a] for r in rows) / len(rows) for a in CAPTION_ATTRIBUTES}
    return result


def evaluate_vlm(folder: str | Path, scenes: Sequence[Scene], batch_size: int = 16, max_new_tokens: int = 24,
                 progress: bool = True, examples: int = 5, base_model: str | None = None) -> dict[str, Any]:
    """Answers, accuracy and both blind baselines on `scenes` (single-object scenes ask every question).

    With `base_model`, also how far the VLM's text-only logits are from that text LM's.
    """
    if not scenes:
        raise ValueError("no scenes to evaluate")
    kinds = [k for k in QUESTIONS if all(k in kinds_for(s) for s in scenes)]
    model, processor = load_vlm(folder)
    images = [s.image for s in scenes]
    replies = {k: ask(model, processor, images, QUESTIONS[k], batch_size, max_new_tokens, progress) for k in kinds}
    # The VLM shown nothing: one blank image gives one answer per question, the same for every scene.
    blank = Image.new("RGB", images[0].size, "white")
    blank_replies = {k: ask(model, processor, [blank], QUESTIONS[k], max_new_tokens=max_new_tokens)[0] for k in kinds}
    references = {k: [answer(k, s.objects, s.relation) for s in scenes] for k in kinds}
    majority = {k: Counter(refs).most_common(1)[0][0] for k, refs in references.items()}
    report = {
        "n": len(scenes),
        "vlm": score_answers(replies, scenes),
        "blank_image": score_answers({k: [v] * len(scenes) for k, v in blank_replies.items()}, scenes),
        "majority_answer": {"accuracy": {k: _accuracy([majority[k]] * len(scenes), references[k]) for k in kinds}},
        "blank_image_answers": blank_replies,
        "majority_answers": majority,
        "examples": [{"question": QUESTIONS[k], "reply": replies[k][i], "reference": references[k][i]}
                     for i in range(min(examples, len(scenes))) for k in kinds],
    }
    if base_model is not None:
        report["text_logits_max_abs_difference"] = text_logits_difference(model, processor, base_model)
    return report


@torch.no_grad()
def text_logits_difference(model: LlavaForConditionalGeneration, processor: ProcessorMixin, base_model: str,
                           prompts: Sequence[str] = TEXT_PROMPTS) -> float:
    """Largest |VLM - base| logit over text-only prompts, on the base's vocabulary (0.0: identical)."""
    text_model, _ = load_text_model(base_model)
    vocab = text_model.get_output_embeddings().weight.shape[0]
    worst = 0.0
    for prompt in prompts:
        ids = processor.tokenizer(prompt, return_tensors="pt").input_ids
        mine = model(input_ids=ids).logits[..., :vocab]
        worst = max(worst, float((mine - text_model(input_ids=ids).logits).abs().max()))
    return worst


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table: accuracy per question for the VLM and the two blind baselines."""
    kinds = list(report["vlm"]["accuracy"])
    lines = [f"held-out scenes: {report['n']}", f"{'question':<28}{'VLM':>8}{'blank image':>13}{'majority':>10}"]
    for kind in kinds:
        lines.append(f"{QUESTIONS[kind]:<28}{report['vlm']['accuracy'][kind]:>8.3f}"
                     f"{report['blank_image']['accuracy'][kind]:>13.3f}{report['majority_answer']['accuracy'][kind]:>10.3f}")
    if "caption_attributes" in report["vlm"]:
        attributes = report["vlm"]["caption_attributes"]
        blank = report["blank_image"]["caption_attributes"]
        lines.append("caption attributes (VLM / blank image): " + ", ".join(
            f"{a} {attributes[a]:.3f} / {blank[a]:.3f}" for a in CAPTION_ATTRIBUTES))
    if "text_logits_max_abs_difference" in report:
        lines.append(f"text-only logits vs the base LM: max |difference| {report['text_logits_max_abs_difference']:.3g}")
    return "\n".join(lines)
