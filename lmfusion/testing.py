"""Tiny, fully offline models and tokenizers for tests and smoke runs (no downloads, < 1 s)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .config import TINY_UNET, LMFusionConfig
from .model.lmfusion import LMFusionModel

_CORPUS = [
    "a small red circle above a large blue square",
    "a large green triangle to the left of a small yellow circle",
    "a purple square below an orange triangle",
    "the quick brown fox jumps over the lazy dog. Hello world!",
    "a photo of a sneaker, a shirt, a bag and an ankle boot",
] * 4


def load_script(path: str | Path) -> ModuleType:
    """A script outside the package (benchmarks/, scripts/) imported as a module, so tests can call it."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in memory: any text encodes, ids stay below `vocab_size`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def tiny_text_model(vocab_size: int, hidden: int = 64, layers: int = 2, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


def tiny_lmfusion_config(base_model: str = "tiny", **overrides) -> LMFusionConfig:
    """Pixel codec at 16 px, 2x2 patches of 8 px: 4 tokens per image."""
    values = dict(
        base_model=base_model,
        image_size=16,
        latent_channels=3,
        latent_size=16,
        patch_size=8,
        **TINY_UNET,
    )
    values.update(overrides)
    return LMFusionConfig(**values)


def save_tiny_base(directory: str | Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny base LM + tokenizer folder that `load_text_model` accepts like any HF model."""
    directory = Path(directory)
    tokenizer = tiny_tokenizer()
    model = tiny_text_model(len(tokenizer), hidden, layers, seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_peaky_base(directory: str | Path, seed: int = 0) -> Path:
    """A tiny base LM + tokenizer folder initialised with a larger std than usual, so its logits
    are peaked: with the default init every greedy step picks the same token and "equals the
    base model" checks are weak."""
    directory = Path(directory)
    tokenizer = tiny_tokenizer()
    tiny_text_model(len(tokenizer), seed=seed, initializer_range=0.2).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_sampling_model(base: str | Path, **overrides) -> LMFusionModel:
    """A tiny LMFusion model over `base` (eval mode) whose noise predictions depend on the model.

    The up block's output conv is zero at init (it predicts zero noise); it is re-drawn here, so
    that sampler comparisons and served images are not trivially equal.
    """
    torch.manual_seed(1)
    model = LMFusionModel.from_text_model(str(base), tiny_lmfusion_config(str(base), **overrides)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.image_out.conv_out.weight, std=0.1)
        torch.nn.init.normal_(model.image_out.conv_out.bias, std=0.1)
    return model


# ---------------------------------------------------------------------- tiny VLMs (LLaVAFusion tests)
VLM_FAMILIES = ("llava", "llava_next", "llava_onevision")
_PINPOINTS = [[32, 32], [32, 64], [64, 32]]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_vlm(family: str = "llava", tower: str = "clip", seed: int = 0):
    """A tiny random LLaVA-family VLM at 32 px (8 px patches), with a peaked language model (so
    greedy checks are strong) and its processor; (model, processor). OneVision's processor needs
    torchvision (its video processor), so for it the processor is None and prompts are built by hand.
    """
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaProcessor,
        SiglipVisionConfig,
    )

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False, initializer_range=0.2)
    vision_class = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[tower]
    vision = vision_class(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=8)
    # CLIP has a CLS token that "default" drops; SigLIP has none, so it keeps every patch ("full").
    strategy = "default" if tower == "clip" else "full"
    common = dict(vision_config=vision, text_config=text, image_token_id=image_id, vision_feature_layer=-1,
                  vision_feature_select_strategy=strategy)
    torch.manual_seed(seed)
    processor = None
    processor_args = dict(tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy=strategy,
                          chat_template=_CHAT_TEMPLATE, num_additional_image_tokens=1 if tower == "clip" else 0)
    if family == "llava":
        model = LlavaForConditionalGeneration(LlavaConfig(**common))
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = LlavaProcessor(image_processor=image_processor, **processor_args)
    elif family == "llava_next":
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(image_grid_pinpoints=_PINPOINTS, **common))
        image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                     image_grid_pinpoints=_PINPOINTS)
        processor = LlavaNextProcessor(image_processor=image_processor, **processor_args)
    elif family == "llava_onevision":
        model = LlavaOnevisionForConditionalGeneration(
            LlavaOnevisionConfig(image_grid_pinpoints=_PINPOINTS, video_token_id=image_id, **common))
    else:
        raise ValueError(f"unknown VLM family {family!r}; one of {VLM_FAMILIES}")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if processor is not None:
        processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def save_tiny_vlm(directory: str | Path, family: str = "llava", tower: str = "clip", seed: int = 0) -> Path:
    """A tiny VLM folder (model + processor) that `load_text_model` and HF's Auto classes load."""
    directory = Path(directory)
    model, processor = tiny_vlm(family, tower, seed)
    if processor is None:
        raise ValueError(f"a {family} folder needs its processor, which cannot be built without torchvision")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
