"""Loss parts, gradient flow and adapter checkpoints."""

import json

import pytest
import torch

from lmfusion.model.lmfusion import CONFIG_FILE, LMFusionModel
from lmfusion.model.sequence import IMAGE_FIRST_MAX_TIMESTEP, SequenceBuilder
from lmfusion.testing import save_tiny_base, tiny_lmfusion_config


@pytest.fixture()
def model(tiny_base):
    model = LMFusionModel.from_text_model(str(tiny_base), tiny_lmfusion_config(str(tiny_base)))
    torch.nn.init.normal_(model.image_out.conv_out.weight, std=0.1)
    return model


def _batch(model, captions=("a small red circle", "a large blue square")):
    builder = SequenceBuilder(model.tokenizer, model.boi_token_id, model.eoi_token_id, model.config.tokens_per_image)
    examples = [builder.text_then_image(captions[0]), builder.image_then_text(captions[1]), builder.text_only("hello")]
    return builder.collate(examples, torch.rand(2, 3, 16, 16) * 2 - 1)


def test_text_targets_skip_boi_and_image_positions(model):
    batch = _batch(model)
    wants, labels = batch.text_targets()
    ids, image = batch.input_ids, batch.image_mask
    boi = ids == model.boi_token_id
    assert not (wants & boi).any() and not (wants & image).any()
    # The last caption token predicts BOI (so the model learns to start images) ...
    assert model.boi_token_id in labels.tolist()
    # ... and EOI predicts the first caption token in image-first examples.
    eoi_row1 = (ids[1] == model.eoi_token_id).nonzero().item()
    assert wants[1, eoi_row1]
    assert batch.max_timesteps.tolist() == [1000, IMAGE_FIRST_MAX_TIMESTEP]


@pytest.mark.parametrize("objective", ["flow", "eps", "v"])
def test_loss_parts_match_their_definitions(tiny_base, objective):
    config = tiny_lmfusion_config(str(tiny_base))
    config.objective = objective
    model = LMFusionModel.from_text_model(str(tiny_base), config)
    torch.nn.init.normal_(model.image_out.conv_out.weight, std=0.1)
    batch = _batch(model)
    out = model.loss(batch, torch.Generator().manual_seed(0))
    # Recompute both parts by hand with the same draws: timesteps first, then noise.
    g = torch.Generator().manual_seed(0)
    t = model.objective.sample_timesteps(2, batch.max_timesteps, g)
    noise = torch.randn(batch.latents.shape, generator=g)
    assert t[1] < IMAGE_FIRST_MAX_TIMESTEP
    x0 = batch.latents
    if objective == "flow":  # straight line from the image (s = 0) to the noise (s = 1)
        s = (t / 1000).float().view(-1, 1, 1, 1)
        noisy, target = (1 - s) * x0 + s * noise, noise - x0
    else:
        a = model.objective.ddpm.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise if objective == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
    full = model(batch.input_ids, batch.image_mask, noisy, t, batch.attention_mask)
    wants, labels = batch.text_targets()
    text = torch.nn.functional.cross_entropy(full.logits[wants], labels)
    image = ((full.noise_pred - target) ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(out.text_loss, text)
    torch.testing.assert_close(out.image_loss, image)
    torch.testing.assert_close(out.loss, text + 5.0 * image)
    assert out.images == 2 and out.text_tokens == labels.numel()
    # The clean-latent estimate inverts the noising exactly when the prediction is the target.
    torch.testing.assert_close(model.objective.clean_estimate(noisy, target, t), x0, atol=1e-4, rtol=1e-4)


def test_text_loss_of_image_first_examples_reaches_image_kv_not_text(model):
    builder = SequenceBuilder(model.tokenizer, model.boi_token_id, model.eoi_token_id, model.config.tokens_per_image)
    # Image first: the caption attends to the image, so the LM loss reaches the image K/V
    # through the frozen text path, while no frozen text weight receives a gradient.
    batch = builder.collate([builder.image_then_text("a red circle")], torch.rand(1, 3, 16, 16))
    wants, labels = batch.text_targets()
    clean = torch.tensor([0])
    logits = model(batch.input_ids, batch.image_mask, batch.latents, clean, batch.attention_mask, logits_mask=wants).logits
    torch.nn.functional.cross_entropy(logits, labels).backward()
    assert model.image_layers[0].k_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.text_model.parameters())


def test_save_load_round_trip_is_bit_identical(model, tmp_path):
    batch = _batch(model)
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert saved["base_model_hash"] and saved["mode"] == "lmfusion"
    # Only the non-base weights are stored.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "lmfusion_weights.safetensors"), "pt") as f:
        assert not any(k.startswith("text_model.") for k in f.keys())
    loaded = LMFusionModel.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        a = model.loss(batch, torch.Generator().manual_seed(3))
        b = loaded.loss(batch, torch.Generator().manual_seed(3))
        t = torch.tensor([10, 400])
        fa = model(batch.input_ids, batch.image_mask, batch.latents, t, batch.attention_mask)
        fb = loaded(batch.input_ids, batch.image_mask, batch.latents, t, batch.attention_mask)
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(fa.logits, fb.logits) and torch.equal(fa.noise_pred, fb.noise_pred)


def test_dense_checkpoint_stores_the_trained_text_weights(tiny_base, tmp_path):
    model = LMFusionModel.from_text_model(str(tiny_base), tiny_lmfusion_config(str(tiny_base), mode="dense"))
    with torch.no_grad():
        model.text_model.model.layers[0].mlp.up_proj.weight.add_(1.0)
    model.save_pretrained(tmp_path / "dense")
    loaded = LMFusionModel.from_pretrained(tmp_path / "dense")
    assert torch.equal(loaded.text_model.model.layers[0].mlp.up_proj.weight, model.text_model.model.layers[0].mlp.up_proj.weight)


def test_load_refuses_another_base_model(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    other = save_tiny_base(tmp_path / "other_base", seed=1)
    with pytest.raises(ValueError, match="wrong base model"):
        LMFusionModel.from_pretrained(tmp_path / "ckpt", base_model=str(other))


def test_a_bfloat16_load_passes_the_base_check_and_is_bfloat16(model, tmp_path):
    # The base's hash is taken in float32 at training; a bf16 load must check that, not its cast.
    model.save_pretrained(tmp_path / "ckpt")
    loaded = LMFusionModel.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    other = save_tiny_base(tmp_path / "other_base", seed=1)
    with pytest.raises(ValueError, match="wrong base model"):
        LMFusionModel.from_pretrained(tmp_path / "ckpt", base_model=str(other), dtype=torch.bfloat16)


def test_load_refuses_non_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an LMFusion checkpoint"):
        LMFusionModel.from_pretrained(tmp_path)


def test_save_overwrites_atomically(model, tmp_path):
    target = tmp_path / "ckpt"
    model.save_pretrained(target)
    model.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


SQUARE = torch.ones(1, 3, 16, 16)
SQUARE[:, :, 4:12, 4:12] = -1  # a dark square on white, as pixel-codec latents in [-1, 1]


@pytest.fixture(scope="module", params=["flow", "eps"])
def memorised(request):
    """A tiny model trained to draw one fixed image for one caption; returns (model, losses)."""
    from lmfusion.testing import tiny_text_model, tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = tiny_lmfusion_config(objective=request.param)
    model = LMFusionModel(tiny_text_model(len(tokenizer)), config, tokenizer=tokenizer)
    builder = SequenceBuilder(model.tokenizer, model.boi_token_id, model.eoi_token_id, model.config.tokens_per_image)
    batch = builder.collate([builder.text_then_image("a square")] * 8, SQUARE.expand(8, -1, -1, -1))
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add contention
    try:
        for step in range(120):
            out = model.loss(batch, torch.Generator().manual_seed(step))
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(out.image_loss.item())
    finally:
        torch.set_num_threads(threads)
    return model.eval(), losses


def test_image_path_learns_to_predict_noise(memorised):
    """A fixed image: training must push the diffusion loss well below 1 (predicting 0; for flow,
    predicting 0 costs 1 + E[x0^2]).

    Guards the U-Net skips: with only a patch-level bottleneck the up block cannot carry
    full-resolution noise and the loss stays at ~1.0.
    """
    _, losses = memorised
    assert sum(losses[:5]) / 5 > 0.7
    assert sum(losses[-10:]) / 10 < 0.3


def test_sampling_draws_the_memorised_image(memorised):
    """End to end: training objective, sampler and clipping agree on what "noise" means.

    The samples must be much closer to the learned image than to its negative. Without
    clipping the clean-latent estimate, this undertrained model's samples drifted to +-9.
    """
    from lmfusion.sampling.image import sample_latents

    model, _ = memorised
    scheduler = "ddpm" if model.config.objective == "eps" else None  # flow: its Euler sampler
    samples = sample_latents(model, "a square", n=4, steps=50, guidance_scale=1.0, seed=0, scheduler=scheduler,
                             progress=False)
    assert samples.abs().max() <= 1.0 + 1e-5
    to_image = (samples - SQUARE).pow(2).mean()
    to_negative = (samples + SQUARE).pow(2).mean()
    assert to_image < 0.5 * to_negative, (to_image, to_negative)


def test_noise_caps_follow_num_train_timesteps(model):
    builder = SequenceBuilder(model.tokenizer, model.boi_token_id, model.eoi_token_id, model.config.tokens_per_image,
                              num_train_timesteps=200)
    batch = builder.collate([builder.text_then_image("a"), builder.image_then_text("b")], torch.zeros(2, 3, 16, 16))
    assert batch.max_timesteps.tolist() == [200, 100]
