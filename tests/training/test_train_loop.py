"""The loop: objective, loss going down, samples, precision and text-only options, errors."""

from __future__ import annotations

import json

import pytest
import torch

from lmfusion.cli import main
from lmfusion.training import train
from lmfusion.training.checkpoint import load_checkpoint, resolve_checkpoint
from lmfusion.training.data import build_batch_source, load_or_encode
from lmfusion.training.loop import build_model, build_optimizer, build_scheduler, loss_sums


def _fixed_eval_loss(model, source, batches: int = 3) -> tuple[float, float]:
    """Mean (text, image) loss over fixed batches with fixed noise: a deterministic yardstick."""
    text = image = 0.0
    with torch.no_grad():
        for k in range(batches):
            batch, _ = source.batch(range(1000 + 8 * k, 1008 + 8 * k))
            out = model.loss(batch, torch.Generator().manual_seed(k))
            text, image = text + float(out.text_loss), image + float(out.image_loss)
    return text / batches, image / batches


def test_loss_sums_match_model_loss(make_config):
    config = make_config()
    model, codec = build_model(config)
    source = build_batch_source(load_or_encode(config.data, 16, codec, config.latent_cache), model, config)
    batch, _ = source.batch(range(8))
    reference = model.loss(batch, torch.Generator().manual_seed(5))
    sums = loss_sums(model, model, batch, torch.Generator().manual_seed(5))
    mine = sums.text / sums.text_tokens + model.config.diffusion_loss_weight * sums.image / sums.images
    assert sums.text_tokens == reference.text_tokens and sums.images == reference.images
    torch.testing.assert_close(mine, reference.loss, rtol=1e-6, atol=1e-6)


def test_training_reduces_the_loss_and_writes_a_run(make_config):
    # 2x2 patches (64 tokens per 16 px image): with 8x8 patches the image blocks' bottleneck keeps
    # the diffusion loss near 1 for hundreds of steps, which would hide a broken image path.
    config = make_config(max_steps=30, batch_size=8, lr=3e-3, min_lr=3e-4, patch_size=2, checkpoint_every=15,
                         sample_every=30, sample_steps=3, sample_prompts=["a red circle", "a blue square"])
    summary = train(config)
    model, codec = build_model(config)
    source = build_batch_source(load_or_encode(config.data, 16, codec, config.latent_cache), model, config)
    before = _fixed_eval_loss(model, source)
    optimizer = build_optimizer(model, config)
    load_checkpoint(resolve_checkpoint(config.run_dir).parent, model, optimizer, build_scheduler(optimizer, config))
    after = _fixed_eval_loss(model, source)
    assert after[0] < before[0] - 0.05 and after[1] < before[1] - 0.2, (before, after)

    run = config.run_dir
    assert summary["steps"] == 30 and len(summary["history"]) == 30
    assert (run / "config.yaml").is_file() and (run / "latest").read_text().strip() == "step_000030"
    assert resolve_checkpoint(run) == run / "checkpoints" / "step_000030" / "model"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 31))
    assert all(m["tokens_per_s"] > 0 and m["images"] > 0 for m in lines)
    assert all(m["flops_per_s"] > 0 and "mfu" not in m for m in lines)  # CPU: no known peak, so no MFU
    assert (run / "samples" / "step_000030.png").is_file()
    assert "a blue square" in (run / "samples" / "step_000030.txt").read_text()
    assert "data: 12 records" in (run / "train.log").read_text()


def test_bf16_autocast_and_text_only_examples_run(make_config):
    summary = train(make_config(precision="bf16", text_only_ratio=0.5, max_steps=2, name="bf16"))
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in summary["history"])
    summary = train(make_config(gradient_checkpointing=True, max_steps=2, name="ckpt", micro_batch_size=2))
    assert summary["steps"] == 2


@pytest.mark.parametrize("native", [False, True])
def test_precision_auto_trains_in_bf16_only_where_it_is_native_and_records_what_ran(make_config, monkeypatch, native):
    from lmfusion.training import loop
    from lmfusion.training.config import TrainConfig, read_yaml

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    seen = []
    real_autocast = loop.autocast
    monkeypatch.setattr(loop, "autocast", lambda config, info: seen.append(config.precision) or real_autocast(config, info))
    config = make_config(precision="auto", max_steps=1, name=f"auto_{native}")
    train(config)
    want = "bf16" if native else "fp32"
    assert set(seen) == {want}
    assert TrainConfig.from_dict(read_yaml(config.run_dir / "config.yaml")).precision == want
    train(make_config(precision="auto", max_steps=2, name=f"auto_{native}"), resume=True)  # same machine: resumable


def test_precision_auto_is_fp32_where_the_kernels_are_capped_at_avx2(monkeypatch):
    from lmfusion.training.loop import native_bf16

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert native_bf16(torch.device("cpu"))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # ATEN_CPU_CAPABILITY=avx2
    assert not native_bf16(torch.device("cpu"))


def test_existing_run_needs_resume_or_overwrite(make_config):
    train(make_config(max_steps=1))
    with pytest.raises(ValueError, match="--resume"):
        train(make_config(max_steps=1))
    with pytest.raises(ValueError, match="lr differ"):
        train(make_config(max_steps=2, lr=0.5), resume=True)
    assert train(make_config(max_steps=1), overwrite=True)["steps"] == 1


def test_empty_dataset_is_a_one_line_cli_error(tiny_base, tmp_path, capsys):
    data = tmp_path / "empty"
    data.mkdir()
    (data / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "a red circle"}\n{"file_name": "x.png", "text": ""}\n')
    code = main(["train", "--preset", "tiny", "--base-model", str(tiny_base), "--data", str(data),
                 "--runs-dir", str(tmp_path / "runs"), "--latent-cache", "none", "--progress", "false"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("lmfusion train: error: no usable") and "skipped=2" in last
