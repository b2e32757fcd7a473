"""Assemble a LLaVA-style VLM from a pretrained text LM and a fresh SigLIP vision tower.

Everything here is plain transformers: a `LlavaForConditionalGeneration` whose language model
holds the text LM's weights unchanged, and a `LlavaProcessor` that expands `<image>` into as
many placeholder tokens as the tower makes patches. The saved folder needs no lmfusion code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from ..base_models import load_text_model

IMAGE_TOKEN = "<image>"
END_OF_TURN = "<|im_end|>"
# SmolLM2-Instruct's own template (default system prompt included), extended so that a user turn
# may be a list of parts: an image part becomes the `<image>` placeholder on its own line.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TowerSpec:
    """The vision tower: a SigLIP ViT trained from scratch (no pretrained weights are reachable)."""

    image_size: int = 64
    patch_size: int = 16
    hidden_size: int = 256
    layers: int = 4
    heads: int = 4

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.heads:
            raise ValueError(f"tower hidden_size {self.hidden_size} is not a multiple of heads {self.heads}")
        if min(self.image_size, self.patch_size, self.hidden_size, self.layers, self.heads) < 1:
            raise ValueError(f"every tower size must be positive, got {self}")

    def config(self) -> SiglipVisionConfig:
        self.validate()
        return SiglipVisionConfig(
            hidden_size=self.hidden_size, intermediate_size=4 * self.hidden_size,
            num_hidden_layers=self.layers, num_attention_heads=self.heads,
            image_size=self.image_size, patch_size=self.patch_size,
            vision_use_head=False,  # Llava reads the patch features; a pooling head would never get a gradient
        )


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends an assistant turn: `<|im_end|>` when the vocabulary has it, else EOS."""
    token_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    return token_id if token_id is not None and token_id != tokenizer.unk_token_id else tokenizer.eos_token_id


def make_processor(tokenizer: PreTrainedTokenizerBase, tower: TowerSpec) -> LlavaProcessor:
    """A LlavaProcessor whose `<image>` expands to `tower.image_tokens` placeholders.

    SigLIP has no CLS token, so the strategy is "full" and no extra token is added; its images
    are scaled to [-1, 1] (mean and std 0.5), SigLIP's own normalisation.
    """
    image_processor = SiglipImageProcessorPil(
        size={"height": tower.image_size, "width": tower.image_size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    # Batched generate needs the prompts to end where the answers begin.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = CHAT_TEMPLATE
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=tower.patch_size,
        vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
    )


def _add_image_token(text_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """Add `<image>` as a special token; grow the embeddings only if its id falls outside them.

    Every existing id and row is kept. A new row is zero: Llava overwrites the placeholder's
    embedding with image features, so the row is never read as an input, and with tied
    embeddings a zero row gives the `<image>` logit 0, which never beats the text tokens a
    pretrained LM predicts (the text model's greedy outputs stay its own).
    """
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    old_rows = text_model.get_input_embeddings().weight.shape[0]
    if image_id >= old_rows:
        text_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            text_model.get_input_embeddings().weight[old_rows:] = 0
            if not text_model.config.tie_word_embeddings:
                text_model.get_output_embeddings().weight[old_rows:] = 0
    return image_id


def build_vlm(base_model: str, tower: TowerSpec, seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A Llava VLM: `base_model`'s weights as the language model, a random tower, a random projector."""
    text_model, tokenizer = load_text_model(base_model)
    image_id = _add_image_token(text_model, tokenizer)
    config = LlavaConfig(
        vision_config=tower.config(), text_config=text_model.config, image_token_index=image_id,
        image_seq_length=tower.image_tokens, vision_feature_select_strategy="full", vision_feature_layer=-1,
        projector_hidden_act="gelu", tie_word_embeddings=text_model.config.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    vlm = LlavaForConditionalGeneration(config)
    vlm.model.language_model.load_state_dict(text_model.model.state_dict())
    if not config.tie_word_embeddings:
        vlm.lm_head.load_state_dict(text_model.lm_head.state_dict())
    vlm.generation_config.eos_token_id = end_of_turn_id(tokenizer)
    vlm.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    vlm.generation_config.do_sample = False
    return vlm.eval(), make_processor(tokenizer, tower)


def language_parameters(vlm: LlavaForConditionalGeneration) -> list[torch.nn.Parameter]:
    """The language model and head: frozen for good (the VLM is also the text LM, unchanged)."""
    return list(vlm.model.language_model.parameters()) + list(vlm.lm_head.parameters())


def vision_parameters(vlm: LlavaForConditionalGeneration) -> list[torch.nn.Parameter]:
    """What training may move: the tower (stage 0; stage 1 only with tower_lr_scale > 0) and the projector."""
    return list(vlm.model.vision_tower.parameters()) + list(vlm.model.multi_modal_projector.parameters())
