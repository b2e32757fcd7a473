"""Questions about images, answered by a VLM base through its own understanding path.

With a LLaVA-family base (LLaVAFusion) the VLM's processor builds the prompt (chat template,
`<image>` placeholders expanded to its feature count, pixel values), and decoding runs on the
frozen path, so greedy answers are the VLM's own `generate(..., do_sample=False)`, token for token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.images import open_rgb_pil, to_pil
from .text import Context, TokenPicker, decode, eos_ids, max_positions, vocabulary_mask

# What the VLM is asked when it is only told to caption (the tiny LLaVA's training prompt, lmfusion/vlm).
DEFAULT_CAPTION_QUESTION = "Describe the image."
# What a processor returns beside the tokens that LMFusionModel.forward takes (model/vlm.py).
VISION_INPUTS = ("pixel_values", "image_sizes", "batch_num_images")


def require_vlm(model) -> None:
    if not model.is_vlm:
        raise ValueError("answering questions about images needs a VLM base (e.g. a LLaVA folder); this model's "
                         "base is a text LM: use caption, or train on a VLM with the llavafusion preset")
    if model.processor is None:
        raise ValueError("this VLM-based model has no processor: load it from the VLM's folder "
                         "(LMFusionModel.from_text_model(path) or from_pretrained)")


def vlm_prompt(model, question: str, n_images: int) -> str:
    """The VLM's own prompt for `question` about `n_images` images: its chat template, user turn."""
    processor = model.processor
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor.image_token * n_images + "\n" + question  # a template-less VLM: placeholders first


def vlm_inputs(model, images_per_question: Sequence[Sequence], questions: Sequence[str]) -> tuple[list[list[int]], dict]:
    """Token lists (unpadded) and the vision inputs the processor makes for a batch of questions."""
    require_vlm(model)
    if len(images_per_question) != len(questions) or not questions:
        raise ValueError(f"{len(questions)} questions but {len(images_per_question)} image lists")
    for question in questions:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question is empty")
    prompts = [vlm_prompt(model, q, len(images)) for q, images in zip(questions, images_per_question)]
    flat = [_as_pil(image) for images in images_per_question for image in images]
    inputs = model.processor(images=flat or None, text=prompts, return_tensors="pt", padding=True)
    mask = inputs["attention_mask"].bool()
    token_lists = [ids[row_mask].tolist() for ids, row_mask in zip(inputs["input_ids"], mask)]
    limit = max_positions(model)
    for tokens in token_lists:
        if len(tokens) >= limit:
            raise ValueError(f"the prompt with its images is {len(tokens)} tokens; the VLM allows at most {limit - 1}")
    vision = {k: inputs[k] for k in VISION_INPUTS if k in inputs}
    if "pixel_values" in vision:
        vision["pixel_values"] = vision["pixel_values"].to(model.special_head.weight.dtype)
    return token_lists, vision


def _as_pil(image):
    """A path, bytes or PIL image (decoded and checked), or a [3, H, W] tensor in [0, 1]."""
    return to_pil(image) if isinstance(image, torch.Tensor) else open_rgb_pil(image)


@torch.no_grad()
def answer_batch(model, images_per_question: Sequence[Sequence], questions: Sequence[str], max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, use_cache: bool = True) -> list[str]:
    """One answer per question; `images_per_question[i]` are the images (paths / PIL) question i is about."""
    token_lists, vision = vlm_inputs(model, images_per_question, questions)
    return answer_inputs(model, token_lists, vision, max_new_tokens, temperature, top_p, seed, use_cache)


@torch.no_grad()
def answer_inputs(model, token_lists: list[list[int]], vision: dict, max_new_tokens: int = 32,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                  use_cache: bool = True) -> list[str]:
    """`answer_batch` on prompts `vlm_inputs` already built (a caller that also counts their tokens)."""
    picker = TokenPicker(temperature, top_p, seed)
    context = Context.from_tokens(model, token_lists, use_cache=use_cache, vision=vision)
    new_ids = decode(context, max_new_tokens, picker, vocabulary_mask(model), eos_ids(model, base_only=True))
    return [model.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new_ids]


def answer(model, image, question: str, **options) -> str:
    """The VLM's answer to `question` about `image` (a path or PIL image, or a list of them)."""
    images = list(image) if isinstance(image, (list, tuple)) or (torch.is_tensor(image) and image.dim() == 4) else [image]
    return answer_batch(model, [images], [question], **options)[0]
