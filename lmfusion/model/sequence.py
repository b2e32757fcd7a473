"""Interleaved sequences: text token ids with runs of image patch positions between BOI and EOI."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Transfusion §4.3.4: when the image comes before its caption, noise is capped at t < 500 (of
# 1,000 training timesteps) so the caption is conditioned on a recognisable image. With another
# num_train_timesteps the cap keeps that fraction: half of the schedule.
IMAGE_FIRST_MAX_TIMESTEP = 500
IMAGE_FIRST_FRACTION = 0.5
# A noise cap of 0 marks a clean context image: it enters at t = 0, exactly as the samplers append
# a finished image (Context.append_image), and carries no diffusion loss (an editing source).
CLEAN_IMAGE = 0


@dataclass
class Example:
    """One sequence before padding: ids (image positions hold -1) and its images' noise caps."""

    ids: list[int] = field(default_factory=list)
    max_timesteps: list[int] = field(default_factory=list)

    def add_text(self, ids: list[int]) -> "Example":
        self.ids.extend(ids)
        return self

    def add_image(self, boi: int, eoi: int, tokens_per_image: int, max_timestep: int) -> "Example":
        self.ids.extend([boi] + [-1] * tokens_per_image + [eoi])
        self.max_timesteps.append(max_timestep)
        return self


@dataclass
class MultimodalBatch:
    input_ids: torch.Tensor  # [B, L]; image positions hold pad_id
    image_mask: torch.Tensor  # [B, L] bool
    attention_mask: torch.Tensor  # [B, L] 1 = real token
    latents: torch.Tensor | None  # [N, C, H, W] clean latents, in reading order
    max_timesteps: torch.Tensor  # [N]
    # Packed rows (SequenceBuilder.pack): which example each position belongs to (-1 = padding)
    # and its position inside that example. None for padded rows, where each row is one example.
    document_ids: torch.Tensor | None = None  # [B, L]
    position_ids: torch.Tensor | None = None  # [B, L]

    def to(self, device) -> "MultimodalBatch":
        def move(t):
            return None if t is None else t.to(device)

        return MultimodalBatch(move(self.input_ids), move(self.image_mask), move(self.attention_mask),
                               move(self.latents), move(self.max_timesteps), move(self.document_ids),
                               move(self.position_ids))

    @property
    def loss_images(self) -> torch.Tensor:
        """[N] bool: the images that are noised and carry the diffusion loss (not clean context)."""
        return self.max_timesteps != CLEAN_IMAGE

    @property
    def num_loss_images(self) -> int:
        return int(self.loss_images.sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def fill(self) -> float:
        """Real tokens over computed positions: 1 - the padding share (the packing efficiency)."""
        return self.num_tokens / max(self.attention_mask.numel(), 1)

    def text_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions that predict a next text token, and those tokens.

        A text position i is trained to predict token i+1 when that is a real text token; the
        BOI position (followed by patches) and image positions (EOI is forced) have no LM loss.
        """
        real = self.attention_mask.bool()
        text = real & ~self.image_mask
        wants = torch.zeros_like(text)
        wants[:, :-1] = text[:, :-1] & text[:, 1:]
        if self.document_ids is not None:  # an example's last token does not predict the next one's first
            wants[:, :-1] &= self.document_ids[:, :-1] == self.document_ids[:, 1:]
        labels = self.input_ids[:, 1:][wants[:, :-1]]
        return wants, labels


class SequenceBuilder:
    """Tokenises captions and lays out the two training orders of the paper."""

    def __init__(self, tokenizer, boi_id: int, eoi_id: int, tokens_per_image: int, max_text_tokens: int = 64,
                 num_train_timesteps: int = 1000):
        self.tokenizer = tokenizer
        self.num_train_timesteps = num_train_timesteps  # text-first images draw t from the whole schedule
        self.boi_id, self.eoi_id = boi_id, eoi_id
        self.tokens_per_image = tokens_per_image
        self.max_text_tokens = max_text_tokens
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_id or 0)
        self.truncated = 0  # captions cut to max_text_tokens, reported by the data loop

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) > self.max_text_tokens:
            self.truncated += 1
            ids = ids[: self.max_text_tokens]
        return ids

    def text_then_image(self, caption: str) -> Example:
        """Caption, then the image (text-to-image). An empty caption is the CFG unconditional case."""
        example = Example().add_text(self.encode(caption) if caption else [])
        example.add_image(self.boi_id, self.eoi_id, self.tokens_per_image, self.num_train_timesteps)
        return example.add_text([self.eos_id])

    def image_then_text(self, caption: str, max_timestep: int | None = None) -> Example:
        """The image, then its caption (captioning); its noise is capped at half the schedule."""
        if max_timestep is None:
            max_timestep = int(self.num_train_timesteps * IMAGE_FIRST_FRACTION)
        example = Example().add_image(self.boi_id, self.eoi_id, self.tokens_per_image, max_timestep)
        return example.add_text(self.encode(caption) + [self.eos_id])

    def edit(self, instruction: str, drop_source: bool = False, drop_instruction: bool = False) -> Example:
        """`[BOI source EOI] instruction [BOI target EOI] EOS` (InstructPix2Pix's order, Transfusion §4.5).

        The source is clean (t = 0, no loss), as the sampler appends it at inference; the target
        is noised over the whole schedule and carries the loss. Text loss follows the usual rule
        (text_targets). Dropping the source, the instruction or both gives the branches that
        two-way guidance subtracts; with both dropped this is text_then_image("").
        The example's images, in order: the source (unless dropped), then the target.
        """
        example = Example()
        if not drop_source:
            example.add_image(self.boi_id, self.eoi_id, self.tokens_per_image, CLEAN_IMAGE)
        example.add_text([] if drop_instruction else self.encode(instruction))
        example.add_image(self.boi_id, self.eoi_id, self.tokens_per_image, self.num_train_timesteps)
        return example.add_text([self.eos_id])

    def text_only(self, text: str) -> Example:
        return Example().add_text(self.encode(text) + [self.eos_id])

    def collate(self, examples: list[Example], latents: torch.Tensor | None) -> MultimodalBatch:
        """Right-pad examples into a batch; latents are the examples' images in order."""
        length = max(len(e.ids) for e in examples)
        ids = torch.full((len(examples), length), self.pad_id, dtype=torch.long)
        image_mask = torch.zeros(len(examples), length, dtype=torch.bool)
        attention = torch.zeros(len(examples), length, dtype=torch.long)
        for row, example in enumerate(examples):
            row_ids = torch.tensor(example.ids, dtype=torch.long)
            is_image = row_ids < 0
            ids[row, : len(row_ids)] = row_ids.masked_fill(is_image, self.pad_id)
            image_mask[row, : len(row_ids)] = is_image
            attention[row, : len(row_ids)] = 1
        return MultimodalBatch(ids, image_mask, attention, latents, self._image_caps(examples, latents))

    def pack(self, examples: list[Example], latents: torch.Tensor | None, pack_length: int) -> MultimodalBatch:
        """Concatenate examples, in order and never split, into rows of exactly pack_length tokens.

        A row takes examples until the next one does not fit; only each row's tail is padding.
        Each example is its own document (positions restart at 0, attention stays inside it), so
        a packed batch computes what the same examples padded one per row compute.
        """
        rows: list[list[Example]] = [[]]
        used = 0
        for example in examples:
            if len(example.ids) > pack_length:
                raise ValueError(f"an example of {len(example.ids)} tokens does not fit pack_length {pack_length}; "
                                 "raise pack_length or lower max_text_tokens")
            if used + len(example.ids) > pack_length:
                rows.append([])
                used = 0
            rows[-1].append(example)
            used += len(example.ids)
        shape = (len(rows), pack_length)
        ids = torch.full(shape, self.pad_id, dtype=torch.long)
        image_mask = torch.zeros(shape, dtype=torch.bool)
        attention = torch.zeros(shape, dtype=torch.long)
        documents = torch.full(shape, -1, dtype=torch.long)
        positions = torch.zeros(shape, dtype=torch.long)
        document = 0
        for row, members in enumerate(rows):
            start = 0
            for example in members:
                row_ids = torch.tensor(example.ids, dtype=torch.long)
                span = slice(start, start + len(row_ids))
                is_image = row_ids < 0
                ids[row, span] = row_ids.masked_fill(is_image, self.pad_id)
                image_mask[row, span] = is_image
                attention[row, span] = 1
                documents[row, span] = document
                positions[row, span] = torch.arange(len(row_ids))
                start += len(row_ids)
                document += 1
        return MultimodalBatch(ids, image_mask, attention, latents, self._image_caps(examples, latents), documents, positions)

    @staticmethod
    def _image_caps(examples: list[Example], latents: torch.Tensor | None) -> torch.Tensor:
        caps = [t for e in examples for t in e.max_timesteps]
        n_images = len(caps)
        if (latents is None and n_images) or (latents is not None and latents.shape[0] != n_images):
            raise ValueError(f"examples hold {n_images} images but {0 if latents is None else latents.shape[0]} latents were given")
        return torch.tensor(caps, dtype=torch.long)
