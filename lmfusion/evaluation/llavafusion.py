"""LLaVAFusion on shapes: the VLM's understanding unchanged, and the drawing the new modules add.

Everything is measured on held-out shapes scenes (a seed the runs never trained on):

* **answers**: the VLM's greedy answers to the shapes questions (lmfusion/vlm/questions.py), once
  from the VLM folder alone with transformers (`before`) and once through the trained LMFusion
  model (`after`); they must be the same strings, and both are scored against the scene.
* **generation**: one image per held-out caption at each guidance scale, scored by the shapes
  oracle (prompted colour on white, every attribute right).
* **self-consistency**: the VLM asked about each image the model drew, in its own prompt format;
  its answers are checked against the prompt's attributes (a blind check: the VLM never saw the prompt).
* **image context**: the same questions asked *in the drawing's own context*, with the drawn image
  kept there as latents, as the VLM's reading of it, or both (sampling/interleaved.py,
  `image_context`): what a chat that draws and then talks about its drawing gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.images import to_pil
from ..sampling.image import decode_latents
from ..sampling.interleaved import IMAGE_CONTEXTS, append_drawn_image
from ..sampling.pipeline import LMFusionPipeline
from ..sampling.text import Context, TokenPicker, decode, eos_ids, vocabulary_mask
from ..sampling.understanding import answer_batch
from ..vlm.questions import QUESTIONS, Scene, answer
from .generation import generate_images, oracle_scores

ATTRIBUTES = ("colour", "shape", "size")  # what a single-object prompt fixes and a question can check


def lmfusion_replies(model, scenes: Sequence[Scene], kinds: Sequence[str], batch_size: int = 16,
                     progress: bool = False) -> dict[str, list[str]]:
    """The VLM's greedy answers, run through the LMFusion model's frozen path."""
    replies: dict[str, list[str]] = {}
    for kind in kinds:
        said: list[str] = []
        for start in tqdm(range(0, len(scenes), batch_size), desc=f"answers: {kind}", disable=not progress):
            chunk = scenes[start : start + batch_size]
            said += answer_batch(model, [[s.image] for s in chunk], [QUESTIONS[kind]] * len(chunk), max_new_tokens=16)
        replies[kind] = said
    return replies


def compare_replies(before: dict[str, list[str]], after: dict[str, list[str]]) -> dict[str, Any]:
    """Whether two sets of answers are the same strings, and the first differences if not."""
    differences = [{"question": QUESTIONS[kind], "index": i, "before": b, "after": a}
                   for kind in before for i, (b, a) in enumerate(zip(before[kind], after.get(kind, [])))
                   if b != a]
    total = sum(len(v) for v in before.values())
    same_shape = set(before) == set(after) and all(len(before[k]) == len(after[k]) for k in before)
    return {"answers": total, "identical": same_shape and not differences, "different": len(differences),
            "first_differences": differences[:10]}


def accuracy(replies: dict[str, list[str]], scenes: Sequence[Scene]) -> dict[str, float]:
    return {kind: sum(r == answer(kind, s.objects, s.relation) for r, s in zip(said, scenes)) / len(scenes)
            for kind, said in replies.items()}


def generation_scores(pipe: LMFusionPipeline, scenes: Sequence[Scene], guidance_scale: float, steps: int = 20,
                      seed: int = 0, batch_size: int = 16) -> tuple[dict[str, float], torch.Tensor]:
    """Oracle scores of one image per scene caption (image i with seed + i), and the images."""
    prompts = [answer("caption", s.objects, s.relation) for s in scenes]
    images = generate_images(pipe, prompts, seed, steps, guidance_scale, batch_size=batch_size)
    metas = [{"objects": list(s.objects), "relation": s.relation} for s in scenes]
    return oracle_scores(images, metas), images


def self_consistency(model, scenes: Sequence[Scene], images: torch.Tensor, batch_size: int = 16) -> dict[str, float]:
    """The VLM's answers about the drawn images (its own prompt), against each prompt's attributes."""
    drawn = [Scene(to_pil(image), s.objects, s.relation) for image, s in zip(images, scenes)]
    return accuracy(lmfusion_replies(model, drawn, ATTRIBUTES, batch_size), scenes)


@torch.no_grad()
def context_answers(pipe: LMFusionPipeline, scenes: Sequence[Scene], image_context: str, guidance_scale: float,
                    steps: int = 20, seed: int = 0) -> dict[str, float]:
    """Accuracy of questions asked right after the model drew each scene's caption, in that context.

    Per scene: "caption BOI" -> the image sampled (seed + i, as `generation_scores`) -> EOI, with the
    latents kept before it unless `image_context` is "vlm" -> the question as a user turn of the VLM's
    chat template, holding the VLM's own reading of the image unless `image_context` is "latents" ->
    greedy answer, scored by exact match.
    """
    if image_context not in IMAGE_CONTEXTS:
        raise ValueError(f"image_context must be one of {IMAGE_CONTEXTS}, got {image_context!r}")
    model = pipe.model
    prompts = [answer("caption", s.objects, s.relation) for s in scenes]
    hits = {kind: 0 for kind in ATTRIBUTES}
    for index, (prompt, scene) in enumerate(zip(prompts, scenes)):
        latents = pipe.sample_latents([prompt], steps=steps, guidance_scale=guidance_scale, seed=[seed + index],
                                      progress=False)
        image = to_pil(decode_latents(pipe.codec, latents)[0])
        prefix = model.tokenizer(prompt, add_special_tokens=False).input_ids + [model.boi_token_id]
        for kind in ATTRIBUTES:
            context = Context.from_tokens(model, [prefix])
            # The drawn image: its latents stay where they were drawn ("latents", "both"); the VLM's
            # reading of it goes where this VLM reads images, in the question's user turn ("vlm", "both").
            if image_context == "vlm":
                context.append_tokens(torch.tensor([[model.eoi_token_id]]))
            else:
                append_drawn_image(context, latents, [image], "latents")
            content = [{"type": "text", "text": QUESTIONS[kind]}]
            if image_context != "latents":
                content.insert(0, {"type": "image"})
            turn = model.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            ids = model.tokenizer(turn, add_special_tokens=False).input_ids
            if image_context != "latents":  # the turn's one image placeholder -> the VLM's features
                cut = ids.index(model.text_model.config.image_token_id)
                context.append_tokens(torch.tensor([ids[:cut]]))
                context.append_vlm_image([image], model.processor)
                ids = ids[cut + 1:]
            context.append_tokens(torch.tensor([ids]))
            new = decode(context, 16, TokenPicker(), vocabulary_mask(model), eos_ids(model, base_only=True))[0]
            reply = model.tokenizer.decode(new, skip_special_tokens=True).strip()
            hits[kind] += reply == answer(kind, scene.objects, scene.relation)
    return {kind: count / len(scenes) for kind, count in hits.items()}
