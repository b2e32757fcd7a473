"""The running sequence (`Context`) and text decoding on top of it: plain text and captions.

A `Context` is a batch of sequences seen so far: their token ids, which positions are image
patches, the clean images there, and (normally) the K/V cache of all of it plus the logits for
the next token. Every sampler in this package only ever *appends* to a context, so each token or
image is run through the model once. With `use_cache=False` the same object instead re-runs the
whole sequence on every call: slow, but it is the reference the cached path is tested against.

Rows are left-padded, so the newest position is always the last column and positions (derived
from the attention mask by the model) stay contiguous per row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicCache

if TYPE_CHECKING:
    from ..model.lmfusion import LMFusionModel


class Context:
    """Sequences so far, as one left-padded batch, with their K/V cache and next-token logits."""

    def __init__(self, model: "LMFusionModel", ids, image_mask, attention_mask, images, cache, logits):
        self.model = model
        self.ids = ids  # [R, L]; image positions hold the pad id
        self.image_mask = image_mask  # [R, L] bool
        self.attention_mask = attention_mask  # [R, L] 1 = real token, 0 = left padding
        self.images = images  # per row: the clean latents of its images, in order
        self.cache = cache  # DynamicCache over all L positions, or None (recompute mode)
        self.logits = logits  # [R, V + 2] for the token after the last position

    # ------------------------------------------------------------------ building
    @classmethod
    def from_tokens(cls, model: "LMFusionModel", token_lists: Sequence[Sequence[int]], use_cache: bool = True) -> "Context":
        """Left-pad `token_lists` into one batch and run it once (the shared text prefix)."""
        if not token_lists or any(len(t) == 0 for t in token_lists):
            raise ValueError("every sequence needs at least one token")
        device = model.device
        length = max(len(t) for t in token_lists)
        ids = torch.full((len(token_lists), length), pad_id(model), dtype=torch.long, device=device)
        mask = torch.zeros(len(token_lists), length, dtype=torch.long, device=device)
        for row, tokens in enumerate(token_lists):
            ids[row, length - len(tokens):] = torch.tensor(list(tokens), dtype=torch.long)
            mask[row, length - len(tokens):] = 1
        empty = cls._empty(model, len(token_lists), use_cache)
        empty._run(ids, torch.zeros_like(ids, dtype=torch.bool), mask, [[] for _ in token_lists])
        return empty

    @classmethod
    def _empty(cls, model, rows: int, use_cache: bool) -> "Context":
        device = model.device
        nothing = torch.zeros(rows, 0, dtype=torch.long, device=device)
        cache = DynamicCache(config=model.text_config) if use_cache else None
        return cls(model, nothing, nothing.bool(), nothing, [[] for _ in range(rows)], cache, None)

    @property
    def rows(self) -> int:
        return self.ids.shape[0]

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    @property
    def uses_cache(self) -> bool:
        return self.cache is not None

    # ------------------------------------------------------------------ appending
    def append_tokens(self, ids: torch.Tensor) -> None:
        """Append text (or BOI/EOI) tokens [R, k]; updates the logits."""
        ids = ids.to(self.ids.device)
        ones = torch.ones_like(ids)
        self._run(ids, torch.zeros_like(ids, dtype=torch.bool), ones, [[] for _ in range(self.rows)])

    def append_image(self, latents: torch.Tensor) -> None:
        """Append one clean image per row (t = 0) followed by EOI; updates the logits.

        The caller has already appended BOI. Clean, because after sampling (or for captioning)
        the image is known exactly and later tokens should see it without noise.
        """
        n = self.model.config.tokens_per_image
        ids = torch.full((self.rows, n + 1), pad_id(self.model), dtype=torch.long, device=self.ids.device)
        ids[:, -1] = self.model.eoi_token_id
        image_mask = torch.ones_like(ids, dtype=torch.bool)
        image_mask[:, -1] = False
        self._run(ids, image_mask, torch.ones_like(ids), [[image] for image in latents])

    @torch.no_grad()
    def _run(self, ids, image_mask, attention_mask, images) -> None:
        """Append positions and compute the logits after the last one (cached or from scratch)."""
        self.ids = torch.cat([self.ids, ids], 1)
        self.image_mask = torch.cat([self.image_mask, image_mask], 1)
        self.attention_mask = torch.cat([self.attention_mask, attention_mask], 1)
        self.images = [old + new for old, new in zip(self.images, images)]
        if not self.uses_cache:  # no K/V to reuse: run everything again
            ids, image_mask, images = self.ids, self.image_mask, self.images
        wanted = torch.zeros_like(image_mask)
        wanted[:, -1] = True
        latents = [image for row in images for image in row]
        out = self.model(
            input_ids=ids,
            image_mask=image_mask if bool(image_mask.any()) else None,
            image_latents=_as_model_input(self.model, torch.stack(latents)) if latents else None,
            timesteps=torch.zeros(len(latents), dtype=torch.long, device=ids.device) if latents else None,
            attention_mask=self._mask_argument(),
            cache=self.cache,
            use_cache=self.uses_cache,
            logits_mask=wanted,
        )
        self.logits = out.logits.float()

    def _mask_argument(self) -> torch.Tensor | None:
        """The attention mask, or None when nothing is padded (the base model's fast path)."""
        return self.attention_mask if not bool(self.attention_mask.all()) else None

    @torch.no_grad()
    def predict_noise(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Noise prediction for one noisy image per row placed right after the context.

        With a cache the image tokens are appended, run, and cropped off again, so the
        context's K/V are computed once and reused at every denoising step.
        """
        n = self.model.config.tokens_per_image
        ids = torch.full((self.rows, n), pad_id(self.model), dtype=torch.long, device=self.ids.device)
        image_mask = torch.ones_like(ids, dtype=torch.bool)
        attention_mask = torch.cat([self.attention_mask, torch.ones_like(ids)], 1)
        latents = _as_model_input(self.model, latents)
        timesteps = timestep.reshape(1).expand(self.rows).to(ids.device)
        if self.uses_cache:
            before = self.cache.get_seq_length()
            out = self.model(ids, image_mask, latents, timesteps, attention_mask, cache=self.cache, use_cache=True)
            self.cache.crop(before - self.cache.get_seq_length())  # negative: drop the image tokens
            return out.noise_pred.float()
        out = self.model(
            torch.cat([self.ids, ids], 1),
            torch.cat([self.image_mask, image_mask], 1),
            _interleave_images(self.images, latents),
            _interleave_timesteps(self.images, timesteps),
            attention_mask if not bool(attention_mask.all()) else None,
        )
        return _new_image_rows(self.images, out.noise_pred).float()

    # ------------------------------------------------------------------ reshaping the batch
    def select(self, rows: torch.Tensor) -> "Context":
        """A new context holding copies of `rows` (e.g. each prompt repeated n times)."""
        rows = rows.to(self.ids.device)
        cache = None
        if self.uses_cache:
            cache = _new_cache(self.model, [(k.index_select(0, rows), v.index_select(0, rows)) for k, v, *_ in self.cache])
        return Context(
            self.model,
            self.ids.index_select(0, rows),
            self.image_mask.index_select(0, rows),
            self.attention_mask.index_select(0, rows),
            [list(self.images[r]) for r in rows.tolist()],
            cache,
            None if self.logits is None else self.logits.index_select(0, rows),
        )

    @staticmethod
    def stack(contexts: Sequence["Context"]) -> "Context":
        """Concatenate contexts row-wise, left-padding the shorter ones (K/V padded with zeros)."""
        model = contexts[0].model
        length = max(c.length for c in contexts)
        parts = [_left_pad(c, length) for c in contexts]
        cache = None
        if contexts[0].uses_cache:
            layers = zip(*[p["kv"] for p in parts])
            cache = _new_cache(model, [(torch.cat([k for k, _ in layer]), torch.cat([v for _, v in layer])) for layer in layers])
        logits = None if any(c.logits is None for c in contexts) else torch.cat([c.logits for c in contexts])
        return Context(
            model,
            torch.cat([p["ids"] for p in parts]),
            torch.cat([p["image_mask"] for p in parts]),
            torch.cat([p["attention_mask"] for p in parts]),
            [list(images) for c in contexts for images in c.images],
            cache,
            logits,
        )


def _new_cache(model, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A cache holding the given per-layer (keys, values) [R, heads, L, head_dim]."""
    cache = DynamicCache(config=model.text_config)
    for layer, (keys, values) in enumerate(kv):
        cache.update(keys, values, layer)
    return cache


def _left_pad(context: Context, length: int) -> dict:
    extra = length - context.length

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (extra, 0), value=value) if extra else t

    kv = []
    if context.uses_cache:
        for k, v, *_ in context.cache:
            kv.append((torch.nn.functional.pad(k, (0, 0, extra, 0)), torch.nn.functional.pad(v, (0, 0, extra, 0))))
    return {
        "ids": pad(context.ids, pad_id(context.model)),
        "image_mask": pad(context.image_mask, False),
        "attention_mask": pad(context.attention_mask, 0),
        "kv": kv,
    }


def _as_model_input(model, latents: torch.Tensor) -> torch.Tensor:
    """Latents are kept in fp32 for the scheduler math; the model runs in its own dtype."""
    return latents.to(device=model.device, dtype=model.special_head.weight.dtype)


def _interleave_images(images: list[list[torch.Tensor]], new: torch.Tensor) -> torch.Tensor:
    """Reading order over the flattened batch: each row's old images, then its new one."""
    ordered = []
    for row, old in enumerate(images):
        ordered.extend(old)
        ordered.append(new[row])
    return torch.stack(ordered)


def _interleave_timesteps(images: list[list[torch.Tensor]], timesteps: torch.Tensor) -> torch.Tensor:
    parts = []
    for row, old in enumerate(images):
        parts.append(torch.zeros(len(old), dtype=timesteps.dtype, device=timesteps.device))  # clean context images
        parts.append(timesteps[row : row + 1])  # flow timesteps are fractional: keep them as they are
    return torch.cat(parts)


def _new_image_rows(images: list[list[torch.Tensor]], noise_pred: torch.Tensor) -> torch.Tensor:
    """Pick each row's new (last) image out of a reading-order noise prediction."""
    ends = torch.tensor([len(old) + 1 for old in images]).cumsum(0) - 1
    return noise_pred.index_select(0, ends.to(noise_pred.device))


# ---------------------------------------------------------------------- tokens
def pad_id(model) -> int:
    tokenizer = model.tokenizer
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


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
    use_cache: bool = True, codec=None,
):
    """Describe an image: BOI [clean patches, t = 0] EOI, then decode until eos / EOI.

    `image` is a path, a PIL image, a [3, H, W] tensor in [0, 1] (one caption, a str) or a list
    of those / an [N, 3, H, W] tensor (a list of str, decoded as one batch).
    """
    from .image import encode_images, load_images

    pixels, single = load_images(model, image)
    latents = encode_images(model, pixels, codec)
    context = Context.from_tokens(model, [[model.boi_token_id]] * len(latents), use_cache=use_cache)
    context.append_image(latents)
    stops = eos_ids(model) | {model.eoi_token_id}
    picker = TokenPicker(temperature, top_p, seed)
    new_ids = decode(context, max_new_tokens, picker, vocabulary_mask(model, eoi=True), stops)
    texts = [model.tokenizer.decode([t for t in ids if t < model.text_vocab_size], skip_special_tokens=True).strip() for ids in new_ids]
    return texts[0] if single else texts
