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
    # Tokens before this index are never a text target (a chat's user turn: the reply is what is
    # learnt, as SFT masks the prompt); 0 = every text token may be one.
    loss_start: int = 0

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
    # [B, L] bool: whether the token at a position may be a text target (False in a chat's user
    # turn); None = every token may be.
    target_mask: torch.Tensor | None = None
    # [N]: for each image, the index in `latents` of the image before it in its example, -1 for the
    # first (what LMFusionConfig.image_condition "previous" or "residual" conditions on). None = no image has one.
    previous_images: torch.Tensor | None = None

    def to(self, device) -> "MultimodalBatch":
        def move(t):
            return None if t is None else t.to(device)

        return MultimodalBatch(move(self.input_ids), move(self.image_mask), move(self.attention_mask),
                               move(self.latents), move(self.max_timesteps), move(self.document_ids),
                               move(self.position_ids), move(self.target_mask), move(self.previous_images))

    def condition_latents(self) -> torch.Tensor | None:
        """[N, C, H, W]: each image's previous image's clean latent, zeros where it has none."""
        if self.latents is None or self.previous_images is None:
            return None
        index = self.previous_images.to(self.latents.device)
        picked = self.latents.index_select(0, index.clamp(min=0))
        return picked * (index >= 0).view(-1, 1, 1, 1).to(picked.dtype)

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
        if self.target_mask is not None:
            wants[:, :-1] &= self.target_mask[:, 1:]
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

    def chat(self, user_turn: list[int], lead_in: str, n_images: int = 0, reply: str = "",
             reply_stopped: bool = True, clean_single: bool = False) -> Example:
        """A templated conversation: `user_turn` (ids of the rendered user turn, never a target),
        then the assistant's turn, `lead_in [BOI image EOI]... EOS`, or for a text reply
        `reply [EOS]` (EOS only where the base stopped by itself: a reply cut at its token limit
        did not end there).

        What the text loss teaches, with the frozen base logits: the position before each BOI
        predicts BOI (through special_head), every position of a text reply predicts the base's own
        next token, so BOI must stay below it there. Two images follow one another with no text
        between: the decision to draw again is made at the first image's EOI, whose embedding is
        trainable, while text between them would have to come from the frozen head.

        The images: with one, it is a target (noised, diffusion loss). With two, the first enters
        clean (t = 0, no loss) and the second is the target: at inference the sampler appends a
        finished first image clean before the model draws the second, so this is the layout the
        second image is drawn in (as an edit's source and target); the first image's drawing is
        learnt from one-image examples, whose requests are the same kind. `clean_single`: a lone
        image enters clean too, with no loss, so the stop after it is learnt after a clean image,
        as the sampler will have appended it (otherwise only BOI ever follows a clean image's EOI).
        """
        if n_images not in (0, 1, 2):
            raise ValueError(f"a chat example holds 0, 1 or 2 images, got {n_images}")
        example = Example(loss_start=len(user_turn)).add_text(list(user_turn))
        if n_images == 0:
            return example.add_text(self.encode(reply) + ([self.eos_id] if reply_stopped else []))
        example.add_text(self.encode(lead_in) if lead_in else [])
        for k in range(n_images):
            clean = (n_images == 2 and k == 0) or (n_images == 1 and clean_single)
            example.add_image(self.boi_id, self.eoi_id, self.tokens_per_image,
                              CLEAN_IMAGE if clean else self.num_train_timesteps)
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
        targets = self._target_mask(examples, [[(row, 0)] for row in range(len(examples))], ids.shape)
        return MultimodalBatch(ids, image_mask, attention, latents, self._image_caps(examples, latents),
                               target_mask=targets, previous_images=previous_images(examples))

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
        document, starts = 0, []
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
                starts.append((row, start))
                start += len(row_ids)
                document += 1
        targets = self._target_mask([e for members in rows for e in members], [[s] for s in starts], shape)
        return MultimodalBatch(ids, image_mask, attention, latents, self._image_caps(examples, latents), documents, positions,
                               targets, previous_images(examples))

    @staticmethod
    def _target_mask(examples: list[Example], places: list[list[tuple[int, int]]], shape) -> torch.Tensor | None:
        """[B, L] False over each example's first loss_start tokens (at its (row, start) place);
        None when no example masks any, so batches without chats are what they always were."""
        if not any(e.loss_start for e in examples):
            return None
        mask = torch.ones(shape, dtype=torch.bool)
        for example, [(row, start)] in zip(examples, places):
            mask[row, start : start + example.loss_start] = False
        return mask

    @staticmethod
    def _image_caps(examples: list[Example], latents: torch.Tensor | None) -> torch.Tensor:
        caps = [t for e in examples for t in e.max_timesteps]
        n_images = len(caps)
        if (latents is None and n_images) or (latents is not None and latents.shape[0] != n_images):
            raise ValueError(f"examples hold {n_images} images but {0 if latents is None else latents.shape[0]} latents were given")
        return torch.tensor(caps, dtype=torch.long)


def previous_images(examples: list[Example]) -> torch.Tensor | None:
    """MultimodalBatch.previous_images for examples whose images are numbered in order, example by
    example (as their latents are); None when no example holds two images."""
    index, start = [], 0
    for example in examples:
        count = len(example.max_timesteps)
        index += [-1] + list(range(start, start + count - 1)) if count else []
        start += count
    return torch.tensor(index, dtype=torch.long) if any(i >= 0 for i in index) else None
