"""The running sequence (`Context`): what every sampler appends to.

A `Context` is a batch of sequences seen so far: their token ids, which positions are image
patches, the clean images there, and (normally) the K/V cache of all of it plus the logits for
the next token. Every sampler only ever *appends* to a context, so each token or image is run
through the model once. With `use_cache=False` the same object instead re-runs the whole
sequence on every call: slow, but it is the reference the cached path is tested against.

Rows are left-padded, so the newest position is always the last column and positions (derived
from the attention mask by the model) stay contiguous per row.

With a VLM base, the prompt may hold images for the VLM to read (`vision`: its processor's
pixel_values and image_sizes). They enter with the prompt; a cached context never needs them again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicCache

if TYPE_CHECKING:
    from ..model.lmfusion import LMFusionModel


class Context:
    """Sequences so far, as one left-padded batch, with their K/V cache and next-token logits."""

    def __init__(self, model: "LMFusionModel", ids, image_mask, attention_mask, images, cache, logits, vision=None):
        self.model = model
        self.ids = ids  # [R, L]; image positions hold the pad id
        self.image_mask = image_mask  # [R, L] bool
        self.attention_mask = attention_mask  # [R, L] 1 = real token, 0 = left padding
        self.images = images  # per row: the clean latents of its images, in order
        self.cache = cache  # DynamicCache over all L positions, or None (recompute mode)
        self.logits = logits  # [R, V + 2] for the token after the last position
        # The VLM's image inputs for the prompt's placeholders: passed with the prompt's run, and on
        # every run when there is no cache (the recompute reference re-reads everything).
        self.vision = vision or {}
        self._vision_pending = bool(self.vision)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_tokens(cls, model: "LMFusionModel", token_lists: Sequence[Sequence[int]], use_cache: bool = True,
                    vision: dict | None = None) -> "Context":
        """Left-pad `token_lists` into one batch and run it once (the shared text prefix).

        vision: a VLM base's image inputs (pixel_values, image_sizes, ...) for the `<image>`
        placeholders in the tokens, in reading order over the rows.
        """
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
        empty.vision = {k: v.to(device) if torch.is_tensor(v) else v for k, v in (vision or {}).items()}
        empty._vision_pending = bool(empty.vision)
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

    def append_vlm_image(self, image, processor) -> None:
        """Append one image per row as a VLM base *reads* it: its processor's placeholder tokens,
        filled with its own vision features (the understanding path, model/vlm.py).

        `image`: one PIL image per row. A cached context only: the pixel inputs are used once.
        """
        if not self.uses_cache:
            raise ValueError("append_vlm_image needs a context with a KV cache (use_cache=True)")
        images = list(image)
        if len(images) != self.rows:
            raise ValueError(f"{len(images)} images for {self.rows} rows")
        inputs = processor(images=images, text=[processor.image_token] * self.rows, return_tensors="pt",
                           add_special_tokens=False)
        ids = inputs["input_ids"].to(self.ids.device)
        if not bool(inputs["attention_mask"].all()):
            raise ValueError("the images expand to different numbers of placeholder tokens; append them one row at a time")
        self.vision = {k: inputs[k].to(self.ids.device) for k in ("pixel_values", "image_sizes") if k in inputs}
        self.vision["pixel_values"] = self.vision["pixel_values"].to(self.model.special_head.weight.dtype)
        self._vision_pending = True
        self._run(ids, torch.zeros_like(ids, dtype=torch.bool), torch.ones_like(ids), [[] for _ in range(self.rows)])

    @torch.no_grad()
    def _run(self, ids, image_mask, attention_mask, images) -> None:
        """Append positions and compute the logits after the last one (cached or from scratch)."""
        self.ids = torch.cat([self.ids, ids], 1)
        self.image_mask = torch.cat([self.image_mask, image_mask], 1)
        self.attention_mask = torch.cat([self.attention_mask, attention_mask], 1)
        before = [old[-1] if old else None for old in self.images]
        self.images = [old + new for old, new in zip(self.images, images)]
        if not self.uses_cache:  # no K/V to reuse: run everything again (the VLM's images too)
            ids, image_mask, images = self.ids, self.image_mask, self.images
            before = [None] * len(images)
        wanted = torch.zeros_like(image_mask)
        wanted[:, -1] = True
        latents = [image for row in images for image in row]
        vision = self.vision if (self._vision_pending or not self.uses_cache) else {}
        self._vision_pending = False
        out = self.model(
            input_ids=ids,
            image_mask=image_mask if bool(image_mask.any()) else None,
            image_latents=_as_model_input(self.model, torch.stack(latents)) if latents else None,
            timesteps=torch.zeros(len(latents), dtype=torch.long, device=ids.device) if latents else None,
            image_conditions=_previous_image_latents(self.model, list(zip(before, images))),
            attention_mask=self._mask_argument(),
            cache=self.cache,
            use_cache=self.uses_cache,
            logits_mask=wanted,
            **vision,
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
            conditions = _previous_image_latents(self.model, [(old[-1] if old else None, [new])
                                                              for old, new in zip(self.images, latents)])
            out = self.model(ids, image_mask, latents, timesteps, attention_mask, cache=self.cache, use_cache=True,
                             image_conditions=conditions)
            self.cache.crop(before - self.cache.get_seq_length())  # negative: drop the image tokens
            return out.noise_pred.float()
        out = self.model(
            torch.cat([self.ids, ids], 1),
            torch.cat([self.image_mask, image_mask], 1),
            _interleave_images(self.images, latents),
            _interleave_timesteps(self.images, timesteps),
            attention_mask if not bool(attention_mask.all()) else None,
            image_conditions=_previous_image_latents(self.model, [(None, old + [new])
                                                                  for old, new in zip(self.images, latents)]),
            **self.vision,
        )
        return _new_image_rows(self.images, out.noise_pred).float()

    # ------------------------------------------------------------------ reshaping the batch
    def _check_reshapable(self) -> None:
        if self.vision and not self.uses_cache:
            raise ValueError("a context without a KV cache cannot regroup rows that hold VLM images "
                             "(their pixel inputs are per batch): build it with use_cache=True")

    def select(self, rows: torch.Tensor) -> "Context":
        """A new context holding copies of `rows` (e.g. each prompt repeated n times)."""
        rows = rows.to(self.ids.device)
        self._check_reshapable()
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
        for context in contexts:
            context._check_reshapable()
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


def _previous_image_latents(model, rows: list[tuple[torch.Tensor | None, list[torch.Tensor]]]) -> torch.Tensor | None:
    """What LMFusionConfig.image_condition "previous" / "residual" reads: for each row, (the image before the
    listed ones or None, the listed images), the clean latent before every listed image in reading
    order, zeros where there is none, as training gives them (MultimodalBatch.condition_latents).
    None for a model that reads none, or when nothing is listed."""
    if not model.config.reads_previous_image:
        return None
    picked = []
    for before, images in rows:
        for previous, image in zip([before, *images[:-1]], images):
            picked.append(torch.zeros_like(image) if previous is None else previous.to(image.device))
    return _as_model_input(model, torch.stack(picked)) if picked else None


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


def pad_id(model) -> int:
    tokenizer = model.tokenizer
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0
