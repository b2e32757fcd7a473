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
