"""config.skip_dropout: in training, some images' up block must denoise without the U-Net skips."""

import pytest
import torch

from lmfusion.config import LMFusionConfig
from lmfusion.model.image_blocks import ImageDownBlock, ImageUpBlock
from lmfusion.testing import tiny_lmfusion_config

HIDDEN = 16


def _blocks(p: float):
    torch.manual_seed(0)
    config = tiny_lmfusion_config(skip_dropout=p, patch_size=4)
    down, up = ImageDownBlock(config, HIDDEN), ImageUpBlock(config, HIDDEN)
    torch.nn.init.normal_(up.conv_out.weight)  # zero at init would hide every difference
    latents, temb = torch.randn(64, 3, 16, 16), torch.randn(64, config.time_embed_dim)
    hidden = torch.randn(64, config.tokens_per_image, HIDDEN)
    _, skips = down(latents, temb)
    return up, hidden, skips, temb


def _no_skip_output(up, hidden, skips, temb):
    return up(hidden, [torch.zeros_like(s) for s in skips], temb)


def test_training_drops_all_skips_of_about_p_of_the_images_and_keeps_the_rest():
    up, hidden, skips, temb = _blocks(0.5)
    up.eval()  # the same BatchNorm statistics in every call below
    reference = up(hidden, skips, temb)
    without = _no_skip_output(up, hidden, skips, temb)
    up.train()
    up.standardize.eval()  # train mode for the dropout only
    out = up(hidden, skips, temb)
    kept = torch.isclose(out, reference, atol=1e-5).flatten(1).all(1)
    dropped = torch.isclose(out, without, atol=1e-5).flatten(1).all(1)
    assert torch.all(kept ^ dropped)  # each image is one or the other, whole
    assert 16 <= int(dropped.sum()) <= 48  # 64 draws at p 0.5


def test_eval_and_p_zero_always_use_the_skips():
    for p, mode in ((0.5, "eval"), (0.0, "train")):
        up, hidden, skips, temb = _blocks(p)
        up.eval()
        reference = up(hidden, skips, temb)
        getattr(up, mode)()
        up.standardize.eval()
        assert torch.allclose(up(hidden, skips, temb), reference, atol=1e-6)


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_a_share_outside_0_1_is_refused(p):
    with pytest.raises(ValueError, match="skip_dropout"):
        LMFusionConfig(codec={"name": "pixel"}, image_size=16, skip_dropout=p)
