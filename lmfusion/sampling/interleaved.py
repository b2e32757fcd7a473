"""Interleaved generation: text decoding that switches to diffusion whenever the model emits BOI.

One running `Context` (one KV cache) holds the whole exchange. On BOI the image sampler denoises
against that cache, the finished image is appended clean (t = 0) followed by EOI, and text
decoding carries on after it, so later text can refer to the image. A session keeps the
context between turns, which is what `lmfusion chat` uses.

With a VLM base a drawn image can enter the later context in three ways (`image_context`):
"latents", its clean latents through the image modules (as with a text LM; what later images
condition on); "vlm", the VLM's own reading of the decoded image (its vision tower's features at
its placeholders, what its text layers were trained on); or "both". docs/llavafusion.md measures them.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from ..codecs.base import ImageCodec
from ..model.draw_margin import boi_gap
from ..utils import atomic_write_bytes
from .image import check_sampling_args, decode_latents, denoise, image_generators, resolve_guidance_scale
from .context import Context
from .text import TokenPicker, encode_text, eos_ids, max_positions, vocabulary_mask


IMAGE_CONTEXTS = ("latents", "vlm", "both")
# How greedy decoding decides to draw. "token": BOI when it is the single most likely token.
# "mass": BOI when drawing is more likely than writing anything, p(BOI) > 1/2; argmax over one
# token favours BOI, whose probability is not split, over text, whose probability is spread over
# many tokens. Sampling (temperature > 0) draws BOI with its probability either way.
DRAW_DECISIONS = ("mass", "token")


def pick_token(logits: torch.Tensor, picker: TokenPicker, boi_id: int, draw_decision: str = "mass") -> int:
    """The next token of one row from its logits [V + 2] (disallowed ones at -inf). Greedy with
    "mass" picks BOI only when p(BOI) > 1/2, i.e. its logit beats the log-sum-exp of the text's."""
    token = int(picker(logits.unsqueeze(0))[0])
    if token == boi_id and draw_decision == "mass" and picker.temperature == 0:
        if boi_gap(logits, boi_id) <= 0:  # drawing is less likely than writing: the likeliest text token
            text = logits.clone()
            text[boi_id] = float("-inf")
            token = int(text.argmax())
    return token


class InterleavedSession:
    """A running text + image exchange; each `send` continues it and returns the new parts."""

    def __init__(
        self,
        model,
        max_new_tokens: int = 256,
        max_images: int = 4,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        steps: int = 50,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        progress: bool = True,
        image_context: str = "latents",
        *,
        codec: ImageCodec,
        draw_decision: str = "mass",
    ):
        check_sampling_args(steps, guidance_scale, 1, scheduler)
        if draw_decision not in DRAW_DECISIONS:
            raise ValueError(f"draw_decision must be one of {DRAW_DECISIONS}, got {draw_decision!r}")
        self.draw_decision = draw_decision
        if image_context not in IMAGE_CONTEXTS:
            raise ValueError(f"image_context must be one of {IMAGE_CONTEXTS}, got {image_context!r}")
        if image_context != "latents" and not (model.is_vlm and model.processor is not None):
            raise ValueError(f"image_context {image_context!r} needs a VLM base with its processor")
        self.image_context = image_context
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_images < 0:
            raise ValueError(f"max_images must be >= 0, got {max_images}")
        self.model = model
        self.max_new_tokens, self.max_images = max_new_tokens, max_images
        self.picker = TokenPicker(temperature, top_p, seed)
        self.seed = seed if seed is not None else int(torch.randint(2**30, ()))
        self.steps, self.guidance_scale, self.scheduler = steps, resolve_guidance_scale(model, guidance_scale), scheduler
        self.progress, self.codec = progress, codec
        self.context: Context | None = None
        self.pending: int | None = None  # the last token picked but not yet fed (e.g. eos)
        self.images_made = 0

    @torch.no_grad()
    def send(self, text: str) -> list:
        """Append `text` and generate until eos; returns a list of str and PIL images."""
        if not text or not text.strip():
            raise ValueError("prompt is empty")
        ids = ([self.pending] if self.pending is not None else []) + encode_text(self.model, text)
        length = (self.context.length if self.context is not None else 0) + len(ids)
        if length >= max_positions(self.model):
            raise ValueError(f"the conversation would be {length} tokens; the base model allows {max_positions(self.model) - 1}")
        self.pending = None
        if self.context is None:
            self.context = Context.from_tokens(self.model, [ids])
        else:
            self.context.append_tokens(torch.tensor([ids]))
        return self._generate()

    def _generate(self) -> list:
        model, context = self.model, self.context
        parts: list = []
        text_ids: list[int] = []
        stops = eos_ids(model)
        allowed = vocabulary_mask(model, boi=True)
        images_left = self.max_images
        for _ in range(self.max_new_tokens):
            allowed[model.boi_token_id] = images_left > 0 and self._room_for_image()
            token = pick_token(context.logits.masked_fill(~allowed, float("-inf"))[0], self.picker,
                               model.boi_token_id, self.draw_decision)
            if token in stops or context.length + 1 >= max_positions(model):
                self.pending = token
                break
            context.append_tokens(torch.tensor([[token]]))
            if token != model.boi_token_id:
                text_ids.append(token)
                continue
            _flush_text(model, text_ids, parts)
            parts.append(self._image())
            images_left -= 1
        _flush_text(model, text_ids, parts)
        return parts

    def _room_for_image(self) -> bool:
        needed = 2 + self.model.config.tokens_per_image + 1  # BOI, patches, EOI, one more token
        if self.image_context != "latents":
            needed += self._vlm_tokens_per_image()
        return self.context.length + needed <= max_positions(self.model)

    def _vlm_tokens_per_image(self) -> int:
        """Placeholder tokens the VLM's processor gives a drawn image (they all have the model's size)."""
        if getattr(self, "_vlm_tokens", None) is None:
            from PIL import Image

            size = self.model.config.image_size
            processor = self.model.processor
            blank = Image.new("RGB", (size, size), "white")
            self._vlm_tokens = processor(images=[blank], text=processor.image_token, add_special_tokens=False,
                                         return_tensors="pt")["input_ids"].shape[1]
        return self._vlm_tokens

    def _image(self):
        """Denoise an image after the context (which ends in BOI), then append it clean + EOI."""
        model, context = self.model, self.context
        generators = image_generators(self.seed + self.images_made, 1)
        self.images_made += 1
        if self.guidance_scale != 1:  # the conditional row is a padded copy; the context is untouched
            unconditional = Context.from_tokens(model, [[model.boi_token_id]])
            branch = Context.stack([context, unconditional])
        else:  # sample straight on the running cache: each step crops it back
            branch = context
        latents = denoise(model, [branch], generators, self.steps, self.guidance_scale, self.scheduler, self.progress)
        from ..data.images import to_pil

        image = to_pil(decode_latents(self.codec, latents)[0])
        append_drawn_image(context, latents, [image], self.image_context)
        return image


def append_drawn_image(context: Context, latents: torch.Tensor, images: list, image_context: str = "latents") -> None:
    """Close the image each row just drew (its context ends in BOI) and add it to the context as
    `image_context` says: its clean latents + EOI, EOI + the VLM's reading of `images` (PIL), or both."""
    if image_context not in IMAGE_CONTEXTS:
        raise ValueError(f"image_context must be one of {IMAGE_CONTEXTS}, got {image_context!r}")
    model = context.model
    if image_context == "vlm":  # close the drawn image without its latents
        context.append_tokens(torch.full((context.rows, 1), model.eoi_token_id))
    else:
        context.append_image(latents)
    if image_context in ("vlm", "both"):
        context.append_vlm_image(images, model.processor)


def _flush_text(model, text_ids: list[int], parts: list) -> None:
    if text_ids:
        text = model.tokenizer.decode(text_ids, skip_special_tokens=True)
        if text:
            parts.append(text)
        text_ids.clear()


def generate_interleaved(model, prompt: str, *, codec: ImageCodec, **options) -> list:
    """Continue `prompt` with text and images; returns a list of str and PIL images.

    Options are those of `InterleavedSession` (max_new_tokens, max_images, temperature, top_p,
    seed, steps, guidance_scale, scheduler, progress, draw_decision).
    """
    return InterleavedSession(model, codec=codec, **options).send(prompt)


class MarkdownTranscript:
    """A chat written as Markdown with its images saved beside it (image_001.png, ...)."""

    def __init__(self, out_dir: str | Path, name: str = "chat.md"):
        self.dir = Path(out_dir)
        if self.dir.exists() and not self.dir.is_dir():
            raise NotADirectoryError(f"--out {self.dir} exists and is not a folder")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / name
        self.lines: list[str] = []
        self.images = 0

    def add_turn(self, prompt: str, parts: list) -> list[Path]:
        """Record one exchange and rewrite the file; returns the image files written."""
        saved = []
        self.lines.append(f"**User:** {prompt}\n")
        reply = []
        for part in parts:
            if isinstance(part, str):
                reply.append(part)
                continue
            self.images += 1
            path = self.dir / f"image_{self.images:03d}.png"
            buffer = io.BytesIO()
            part.save(buffer, format="PNG")
            atomic_write_bytes(path, buffer.getvalue())
            saved.append(path)
            reply.append(f"\n\n![image {self.images}]({path.name})\n\n")
        self.lines.append("**LMFusion:** " + "".join(reply).strip() + "\n")
        atomic_write_bytes(self.path, "\n".join(self.lines).encode())
        return saved
