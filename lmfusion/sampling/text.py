"""Text decoding on a `Context` (lmfusion.sampling.context): plain text and captions."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..codecs.base import ImageCodec
    from ..model.lmfusion import LMFusionModel

from .context import Context, pad_id  # noqa: F401  (Context re-exported: samplers import it from here)


# ---------------------------------------------------------------------- tokens
def eos_ids(model, base_only: bool = False) -> set[int]:
    """Ids that end text: the base model's generation-config eos, plus the tokenizer's.

    base_only: only what the base model's own `generate` stops at (for exact parity with it).
    Training ends every caption with the tokenizer's eos, so captions stop at either.
    """
    configured = getattr(model.text_model.generation_config, "eos_token_id", None)
    tokenizer_eos = getattr(model.tokenizer, "eos_token_id", None)
    sources = [configured] if base_only and configured is not None else [configured, tokenizer_eos]
    ids = set()
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return ids


def encode_text(model, text: str) -> list[int]:
    """Tokens as in training: no BOS or other special tokens are added."""
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer; build it with from_pretrained or from_text_model(path)")
    return list(model.tokenizer(text, add_special_tokens=False).input_ids)


def max_positions(model) -> int:
    return int(getattr(model.text_config, "max_position_embeddings", 2048))


# ---------------------------------------------------------------------- decoding
class TokenPicker:
    """Greedy (temperature 0) or temperature + nucleus (top-p) sampling with its own seeded RNG."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_p = temperature, top_p
        self.generator = None
        if temperature > 0:
            self.generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**31, ())))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / self.temperature, -1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > self.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        return torch.multinomial(probs.cpu(), 1, generator=self.generator).squeeze(-1).to(logits.device)


def decode(context: Context, max_new_tokens: int, picker: TokenPicker, allowed: torch.Tensor, stop_ids: set[int]) -> list[list[int]]:
    """Extend every row of `context` until it emits a stop id or hits a limit.

    allowed: [V + 2] bool, the logit columns that may be picked (e.g. only the base vocabulary).
    Returns the new ids per row, the stop id included (as transformers' generate does).
    """
    new_ids: list[list[int]] = [[] for _ in range(context.rows)]
    for step in iter_decode(context, max_new_tokens, picker, allowed, stop_ids):
        for row, token in enumerate(step):
            if token is not None:
                new_ids[row].append(token)
    return new_ids


def iter_decode(
    context: Context, max_new_tokens: int, picker: TokenPicker, allowed: torch.Tensor, stop_ids: set[int]
) -> Iterator[list[int | None]]:
    """`decode` one step at a time: each row's new id, or None for a row that has already stopped.

    Arguments are checked before the first step (not lazily), so a caller that streams the
    tokens hears about a bad argument when it asks, not when it starts reading.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return _decode_steps(context, max_new_tokens, picker, allowed, stop_ids)


def _decode_steps(context, max_new_tokens, picker, allowed, stop_ids) -> Iterator[list[int | None]]:
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=context.ids.device)
    blocked = ~allowed.to(context.logits.device)
    done = torch.zeros(context.rows, dtype=torch.bool, device=context.ids.device)
    budget = min(max_new_tokens, max_positions(context.model) - context.length)
    for step in range(budget):
        next_ids = picker(context.logits.masked_fill(blocked, float("-inf")))
        yield [None if finished else token for token, finished in zip(next_ids.tolist(), done.tolist())]
        done |= torch.isin(next_ids, stop)
        if bool(done.all()) or step == budget - 1:
            break
        context.append_tokens(next_ids.masked_fill(done, pad_id(context.model))[:, None])


def vocabulary_mask(model, boi: bool = False, eoi: bool = False) -> torch.Tensor:
    """Which logit columns may be picked: the base vocabulary, plus BOI / EOI if asked."""
    allowed = torch.ones(model.text_vocab_size + 2, dtype=torch.bool)
    allowed[model.boi_token_id] = boi
    allowed[model.eoi_token_id] = eoi
    return allowed


@torch.no_grad()
def generate_text_ids(
    model, input_ids: Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
    seed: int | None = None,
) -> list[int]:
    """New token ids after `input_ids`, base vocabulary only (greedy = the base LM's greedy)."""
    return list(iter_text_ids(model, input_ids, max_new_tokens, temperature, top_p, seed))


def iter_text_ids(
    model, input_ids: Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
    seed: int | None = None,
) -> Iterator[int]:
    """The ids of `generate_text_ids`, yielded one by one as they are picked (for streaming).

    The prompt is checked and run at the call; each `next` then costs one forward. Stopping
    early (closing the iterator) simply skips the remaining tokens.
    """
    if len(input_ids) >= max_positions(model):
        raise ValueError(f"prompt is {len(input_ids)} tokens; the base model allows at most {max_positions(model) - 1}")
    picker = TokenPicker(temperature, top_p, seed)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    context = Context.from_tokens(model, [list(input_ids)])  # Context runs its forwards without autograd
    steps = iter_decode(context, max_new_tokens, picker, vocabulary_mask(model), eos_ids(model, base_only=True))
    return (step[0] for step in steps)


def generate_text(
    model, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None
) -> str:
    """Continue `prompt` with the frozen text path: exactly the base model's text behaviour.

    The prompt is tokenised as the base model's own tokenizer does by default (BOS included when
    it adds one), so greedy output matches `model.text_model.generate(..., do_sample=False)`.
    """
    if not prompt:
        raise ValueError("prompt is empty")
    ids = list(model.tokenizer(prompt).input_ids)
    new = generate_text_ids(model, ids, max_new_tokens, temperature, top_p, seed)
    return model.tokenizer.decode(new, skip_special_tokens=True)


# ---------------------------------------------------------------------- captioning
@torch.no_grad()
def caption(
    model, image, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
    use_cache: bool = True, *, codec: ImageCodec,
):
    """Describe an image: BOI [clean patches, t = 0] EOI, then decode until eos / EOI.

    `image` is a path, a PIL image, a [3, H, W] tensor in [0, 1] (one caption, a str) or a list
    of those / an [N, 3, H, W] tensor (a list of str, decoded as one batch). codec: the model's
    image codec (`LMFusionPipeline` passes its own).
    """
    from .image import encode_images, load_images

    pixels, single = load_images(model, image)
    latents = encode_images(codec, pixels, model.device)
    context = Context.from_tokens(model, [[model.boi_token_id]] * len(latents), use_cache=use_cache)
    context.append_image(latents)
    stops = eos_ids(model) | {model.eoi_token_id}
    picker = TokenPicker(temperature, top_p, seed)
    new_ids = decode(context, max_new_tokens, picker, vocabulary_mask(model, eoi=True), stops)
    texts = [model.tokenizer.decode([t for t in ids if t < model.text_vocab_size], skip_special_tokens=True).strip() for ids in new_ids]
    return texts[0] if single else texts
