"""The image path must listen to its prompt: the failure of issue 9, guarded on a tiny model.

Two captions, two solid-colour images. Trained with the default flow recipe (high-noise shift),
the noise prediction must come through the transformer (stack dependence) and depend on the
caption (prompt gain), and the sampler must draw the prompted image, inside the codec's range.
"""

import pytest
import torch

from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.model.probes import BYPASS_BELOW, bypass_warning, image_probes
from lmfusion.model.sequence import SequenceBuilder
from lmfusion.sampling.image import sample_latents
from lmfusion.testing import tiny_lmfusion_config, tiny_text_model, tiny_tokenizer

RED = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16)
BLUE = torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1).expand(3, 16, 16)
CAPTIONS = ["a red square", "a blue square"]


@pytest.fixture(scope="module")
def conditioned():
    """(model, probes before training) after 300 steps on the two captioned images."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = LMFusionModel(tiny_text_model(len(tokenizer)), tiny_lmfusion_config(), tokenizer=tokenizer)
    builder = SequenceBuilder(model.tokenizer, model.boi_token_id, model.eoi_token_id, model.config.tokens_per_image)
    latents = torch.stack([RED, BLUE] * 4)
    batch = builder.collate([builder.text_then_image(c) for c in CAPTIONS * 4], latents)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before = image_probes(model, latents[:2], CAPTIONS)
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
        for step in range(300):
            model.loss(batch, torch.Generator().manual_seed(step)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), before


def test_prediction_comes_through_the_transformer_and_depends_on_the_prompt(conditioned):
    model, before = conditioned
    after = image_probes(model, torch.stack([RED, BLUE]), CAPTIONS)
    assert abs(before["prompt_gain/high"]) < 0.05  # an untrained model does not use the prompt
    assert after["prompt_gain/high"] > 0.5, after  # pure noise: only the prompt says which image
    assert after["stack_dependence"] > 0.2, after  # the U-Net skips do not bypass the transformer


def test_samples_follow_the_prompt_and_stay_in_range(conditioned):
    model, _ = conditioned
    samples = sample_latents(model, CAPTIONS, n=2, steps=20, guidance_scale=1.0, seed=0, progress=False)
    assert samples.abs().max() <= 1.0 + 1e-5  # the pixel codec's range: the sampler clips there
    for image, want, other in [(samples[0], RED, BLUE), (samples[1], RED, BLUE),
                               (samples[2], BLUE, RED), (samples[3], BLUE, RED)]:
        assert (image - want).pow(2).mean() < 0.25 * (image - other).pow(2).mean()


def test_a_bypassing_stack_is_warned_about_in_one_line():
    assert bypass_warning({"stack_dependence": BYPASS_BELOW + 0.01}, step=300) is None
    assert bypass_warning({"prompt_gain/high": 0.3}, step=300) is None  # no stack probe, nothing to say
    assert bypass_warning({"stack_dependence": 0.09}, step=20) is None  # too early to tell
    assert bypass_warning({"stack_dependence": 0.09}, step=300, warmup_steps=500) is None  # still warming up
    warning = bypass_warning({"stack_dependence": 0.09}, step=300)
    assert warning.startswith("WARNING: stack dependence 0.090") and "\n" not in warning
