"""Training batches for the tiny VLM: chat-templated prompts, answer-only targets, a shared prefix.

Every training prompt starts with the same tokens (the template's system turn and the opening of
the user turn, up to the image). The language model is frozen, so their keys and values never
change: they are computed once (`PrefixCache`) and each step runs only the rest of the sequence.
With SmolLM2 the prefix is 24 tokens of a 53-62 token example (prompt 51-53, answer 2-9), so
this skips about 40% of each step's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image
from transformers import DynamicCache, LlavaForConditionalGeneration, LlavaProcessor

from .build import end_of_turn_id
from .questions import QUESTIONS

IGNORE = -100


def chat_prompt(processor: LlavaProcessor, question: str) -> str:
    """The templated user turn with one image and `question`, ready for the assistant's answer."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@dataclass
class TextBatch:
    """Token ids after the shared prefix, right-padded, with targets only on answer tokens."""

    input_ids: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], IGNORE except answer tokens (and the end-of-turn token)


class PromptEncoder:
    """Token ids of every question's prompt and of answers, cached: there are few distinct ones."""

    def __init__(self, processor: LlavaProcessor, image_tokens: int, image_size: int) -> None:
        self.tokenizer = processor.tokenizer
        self.end_id = end_of_turn_id(self.tokenizer)
        image_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        # The processor's own expansion (it checks the count against the tower's patch grid).
        blank = Image.new("RGB", (image_size, image_size), "white")
        self.prompts: dict[str, list[int]] = {}
        for kind, question in QUESTIONS.items():
            ids = processor(text=chat_prompt(processor, question), images=blank).input_ids[0]
            if ids.count(image_id) != image_tokens:
                raise ValueError(f"prompt for {kind!r} has {ids.count(image_id)} image tokens, expected {image_tokens}")
            self.prompts[kind] = ids
        first = [ids.index(image_id) for ids in self.prompts.values()]
        self.prefix = self.prompts["caption"][: min(first)]
        if any(ids[: len(self.prefix)] != self.prefix for ids in self.prompts.values()):
            raise ValueError("the question prompts do not share their opening tokens")
        self._answers: dict[str, list[int]] = {}

    def answer_ids(self, text: str) -> list[int]:
        """The answer's tokens as generate would produce them after the prompt, then end of turn."""
        if text not in self._answers:
            self._answers[text] = self.tokenizer(text, add_special_tokens=False).input_ids + [self.end_id]
        return self._answers[text]

    def batch(self, kinds: Sequence[str], answers: Sequence[str]) -> TextBatch:
        rows, targets = [], []
        for kind, text in zip(kinds, answers):
            prompt = self.prompts[kind][len(self.prefix):]
            reply = self.answer_ids(text)
            rows.append(prompt + reply)
            targets.append([IGNORE] * len(prompt) + reply)
        width = max(len(row) for row in rows)
        # Right padding after the answer: under the causal mask no real token sees a pad, so no
        # attention mask is needed; pads carry no target.
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id
        input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
        labels = torch.tensor([row + [IGNORE] * (width - len(row)) for row in targets])
        return TextBatch(input_ids, labels)


class PrefixCache:
    """Keys and values of the shared prompt prefix, computed once by the frozen language model."""

    def __init__(self, vlm: LlavaForConditionalGeneration, prefix: list[int]) -> None:
        with torch.no_grad():
            out = vlm.model.language_model(input_ids=torch.tensor([prefix]), use_cache=True)
        cache = out.past_key_values
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]
        self.length = len(prefix)

    def expand(self, batch_size: int) -> DynamicCache:
        """A fresh cache for one step; the forward appends to it, never to the stored tensors."""
        cache = DynamicCache()
        for index, (keys, values) in enumerate(self.layers):
            cache.update(keys.expand(batch_size, -1, -1, -1), values.expand(batch_size, -1, -1, -1), index)
        return cache


def answer_loss(vlm: LlavaForConditionalGeneration, cache: PrefixCache, batch: TextBatch,
                pixel_values: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over answer tokens; the head runs only where there is a target."""
    out = vlm.model(input_ids=batch.input_ids, pixel_values=pixel_values,
                    cache=cache.expand(batch.input_ids.shape[0]), use_cache=True)
    targets = batch.labels[:, 1:]
    scored = targets != IGNORE
    logits = vlm.lm_head(out.last_hidden_state[:, :-1][scored])
    return torch.nn.functional.cross_entropy(logits.float(), targets[scored])
