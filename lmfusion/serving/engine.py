"""The loaded model behind the API: what each endpoint asks of it, through lmfusion.sampling.

Every method here runs on the worker thread (see worker.py) except the `check_*` methods and
`render_chat`, which only tokenize and run in the request handler so that bad input is refused
before it waits in the queue.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..sampling.image import check_sampling_args, prompt_tokens
from ..sampling.pipeline import LMFusionPipeline
from ..sampling.text import eos_ids, iter_text_ids, max_positions
from .worker import ImageWork


@dataclass
class TextResult:
    text: str
    finish_reason: str  # "stop" (the model ended it) or "length" (a token limit ended it)
    prompt_tokens: int
    completion_tokens: int


class Engine:
    """One model and its codec (in an `LMFusionPipeline`); turns API-level requests into sampling calls."""

    def __init__(self, model, name: str = "lmfusion"):
        self.model, self.name = model, name
        self.pipe = LMFusionPipeline(model)
        self.image_size = int(model.config.image_size)
        self.tokenizer = model.tokenizer

    # ------------------------------------------------------------------ checks (request handler)
    def check_image_prompt(self, prompt: str) -> None:
        """Raises ValueError naming the problem (empty, or too many tokens for the model)."""
        prompt_tokens(self.model, prompt)

    def check_scheduler(self, scheduler: str | None) -> None:
        """Raises ValueError unless `scheduler` (None = the default) fits the model's objective."""
        check_sampling_args(1, 1.0, 1, scheduler, getattr(self.model.config, "objective", None))

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids `generate_text` feeds the model for `prompt` (the tokenizer's defaults)."""
        ids = list(self.tokenizer(prompt).input_ids)
        limit = max_positions(self.model) - 1
        if len(ids) > limit:
            raise ValueError(f"the prompt is {len(ids)} tokens; this model reads at most {limit}")
        return ids

    def render_chat(self, messages: Sequence[dict]) -> str:
        """The conversation as one prompt string.

        With a chat template (e.g. SmolLM2-Instruct's) the template renders it and opens the
        assistant's turn; without one the message texts are joined by newlines, so a single user
        message is passed through exactly as written.
        """
        if getattr(self.tokenizer, "chat_template", None):
            # Templates predate OpenAI's "developer" role; it means what "system" did.
            messages = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as error:  # jinja raises its own errors for orders a template refuses
                raise ValueError(f"the model's chat template cannot render these messages: {error}") from error
        return "\n".join(message["content"] for message in messages if message["content"])

    # ------------------------------------------------------------------ work (worker thread)
    def run_images(self, works: Sequence[ImageWork]) -> list[list]:
        """One sampler call for a batch of image requests; PIL images per request, in order.

        Each request's images keep their own seeds (seed, seed + 1, ...), so a request gets the
        same images whatever it was batched with.
        """
        first = works[0]
        prompts = [work.prompt for work in works for _ in range(work.n)]
        seeds = [work.seed + k for work in works for k in range(work.n)]
        if first.source is not None:  # edits (batch_key keeps them apart from generations)
            sources = [work.source for work in works for _ in range(work.n)]
            images = self.pipe.edit(sources, prompts, first.guidance_scale, first.image_guidance_scale, first.steps,
                                    seeds, first.scheduler, n=1, progress=False, strength=first.strength)
        else:
            images = self.pipe.generate_image(
                prompts, steps=first.steps, guidance_scale=first.guidance_scale, seed=seeds,
                scheduler=first.scheduler, n=1, progress=False,
            )
        out, start = [], 0
        for work in works:
            out.append(images[start : start + work.n])
            start += work.n
        return out

    def text(self, prompt_ids: list[int], max_tokens: int, temperature: float, top_p: float, seed: int | None,
             cancelled: threading.Event, on_piece: Callable[[str], None] | None = None) -> TextResult:
        """The base model's continuation (as `generate_text`), optionally piece by piece.

        Pieces are whole characters: a token that ends mid-way through a UTF-8 character waits
        for the next one. Joined, they are the returned text.
        """
        tokens = iter_text_ids(self.model, prompt_ids, max_tokens, temperature, top_p, seed)
        pieces = IncrementalText(self.tokenizer)
        new_ids: list[int] = []
        for token in tokens:
            if cancelled.is_set():
                break
            new_ids.append(token)
            piece = pieces.push(token)
            if piece and on_piece:
                on_piece(piece)
        tail = pieces.finish()
        if tail and on_piece:
            on_piece(tail)
        stopped = bool(new_ids) and new_ids[-1] in eos_ids(self.model, base_only=True)
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)  # exactly generate_text's decode
        return TextResult(text, "stop" if stopped else "length", len(prompt_ids), len(new_ids))

    def caption(self, images: list[torch.Tensor], max_tokens: int, temperature: float, top_p: float,
                seed: int | None) -> list[str]:
        return self.pipe.caption(list(images), max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)

    def answer(self, images: list[bytes], question: str, max_tokens: int, temperature: float, top_p: float,
               seed: int | None) -> TextResult:
        """A VLM base's answer to `question` about all of `images` (one prompt); no question: a caption."""
        from ..sampling.understanding import DEFAULT_CAPTION_QUESTION, answer_inputs, vlm_inputs

        question = question if question.strip() else DEFAULT_CAPTION_QUESTION
        token_lists, vision = vlm_inputs(self.model, [list(images)], [question])  # the processor runs once
        prompt_tokens = len(token_lists[0])  # image features included
        text = answer_inputs(self.model, token_lists, vision, max_new_tokens=max_tokens, temperature=temperature,
                             top_p=top_p, seed=seed)[0]
        completion_tokens = len(self.tokenizer(text, add_special_tokens=False).input_ids)
        finish = "length" if completion_tokens >= max_tokens else "stop"
        return TextResult(text, finish, prompt_tokens, completion_tokens)

    def interleaved(self, prompt: str, max_tokens: int, max_images: int, temperature: float, top_p: float,
                    seed: int | None, steps: int, guidance_scale: float, scheduler: str) -> list:
        """Text and PIL images in reading order."""
        session = self.pipe.chat(
            max_new_tokens=max_tokens, max_images=max_images, temperature=temperature, top_p=top_p, seed=seed,
            steps=steps, guidance_scale=guidance_scale, scheduler=scheduler, progress=False,
        )
        return session.send(prompt)


class IncrementalText:
    """Detokenize a growing list of ids into appended pieces whose join is the full decode."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self._decode()
        if text.endswith("\ufffd") or not text.startswith(self.emitted):  # mid-character: wait
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def finish(self) -> str:
        text = self._decode()
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted += piece
        return piece

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)
