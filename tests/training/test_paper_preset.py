"""The paper preset: a dry run on Llama-3-8B's config.json alone, and 2 real steps at tiny size."""

import json
import re

import pytest
import torch

from lmfusion.cli import main
from lmfusion.config import TINY_UNET
from lmfusion.training import load_config, train
from lmfusion.training.dry_run import dry_run

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
             "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
             "tie_word_embeddings": False, "hidden_act": "silu"}


@pytest.fixture
def llama3_config(tmp_path):
    folder = tmp_path / "llama3-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B))
    return folder


def test_dry_run_on_llama3_8b_config_alone(llama3_config, capsys):
    assert main(["train", "--preset", "paper", "--base-model", str(llama3_config / "config.json"), "--dry-run",
                 "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    total, trainable = (float(x) for x in re.search(r"([\d.]+)B total, ([\d.]+)B trainable", out).groups())
    # Llama-3-8B is 8.03B; the image side copies every decoder layer (6.98B) but not the 1.05B of
    # embeddings and LM head, and adds the U-Net blocks (~0.29B): about 7.3B trainable, 15.3B total.
    assert total == pytest.approx(15.3, abs=0.1) and trainable == pytest.approx(7.27, abs=0.05)
    assert "fsdp" in out and "ddp" in out and "per step" in out
    result = dry_run(load_config("paper", overrides={"base_model": str(llama3_config)}), world_size=8)
    assert result.parameters - result.trainable == pytest.approx(8.03e9, rel=0.01)  # the frozen base, exactly Llama-3-8B
    assert 0.25e9 < result.unet < 0.30e9  # the paper's ~0.27B U-Net down + up blocks
    assert result.tokens_per_example == 256 + 32
    ddp, fsdp = result.memory_gib["ddp"], result.memory_gib["fsdp"]
    assert fsdp["optimizer"] == pytest.approx(ddp["optimizer"] / 8)
    assert ddp["optimizer"] == pytest.approx(8 * result.trainable / 2**30)


def test_dry_run_names_an_unreadable_base_model(tmp_path, monkeypatch):
    # Offline, the hub lookup of the made-up id fails at once instead of waiting out its retries (~20 s).
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="config.json"):
        dry_run(load_config("paper", overrides={"base_model": "no-such-org/no-such-model-xyz"}), world_size=1)


@pytest.fixture
def tiny_vae(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=32)
    vae.save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


def test_paper_preset_trains_two_steps_at_tiny_size(tiny_base, shapes, tiny_vae, tmp_path):
    """The paper's recipe (packing, checkpointing, FSDP setting, AdamW and schedule) with only sizes
    shrunk, plus what a CPU needs: fp32 and the sdpa kernel (flex has no CPU backward)."""
    config = load_config("paper", overrides=dict(
        base_model=str(tiny_base), codec={"name": "diffusers", "path": str(tiny_vae)}, image_size=16, patch_size=2,
        model=dict(TINY_UNET), data=str(shapes), runs_dir=str(tmp_path / "runs"), latent_cache=str(tmp_path / "latents"),
        batch_size=4, micro_batch_size=2, pack_length=128, max_steps=2, precision="fp32", attention="sdpa",
        compile=False, progress=False, threads=1, sample_every=0, probe_every=0))
    summary = train(config)
    assert summary["steps"] == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in summary["history"])
    assert summary["history"][-1]["packing_efficiency"] > 0.3  # 2 examples share one 128-token row
    assert summary["checkpoint"]
