"""LMFusionConfig derives the latent shape from the codec, and says what to set when it cannot."""

import pytest

from lmfusion.config import LMFusionConfig


def test_latent_shape_is_derived_from_the_codec():
    config = LMFusionConfig(codec={"name": "taef2"}, latent_channels=32, patch_size=2)  # no latent_size
    assert (config.latent_channels, config.latent_size, config.tokens_per_image) == (32, 8, 16)
    pixel = LMFusionConfig(image_size=32)
    assert (pixel.latent_channels, pixel.latent_size) == (3, 32)


def test_a_latent_shape_that_contradicts_the_codec_says_what_to_set():
    with pytest.raises(ValueError, match="but latent_size=64: set latent_size=8"):
        LMFusionConfig(codec={"name": "taef2"}, latent_size=64, patch_size=2)
    with pytest.raises(ValueError, match="set latent_channels and latent_size"):
        LMFusionConfig(codec={"name": "diffusers", "path": "x"})


def test_the_standardising_readout_refuses_one_token_images():
    """BatchNorm over the image tokens has one value per dim for a one-image batch: refuse it."""
    with pytest.raises(ValueError, match="more than one token per image"):
        LMFusionConfig(codec={"name": "taef2"}, patch_size=8)  # 8x8 latent in one patch
    assert LMFusionConfig(codec={"name": "taef2"}, patch_size=8, readout="plain").tokens_per_image == 1
