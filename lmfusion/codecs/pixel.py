"""The identity codec: the "latent" is the image itself, rescaled to [-1, 1]."""

from __future__ import annotations

import torch

from .base import ImageCodec


class PixelCodec(ImageCodec):
    """No weights, factor 1, 3 channels: ``latent = 2 * image - 1``.

    It is the embedded default because it needs no download and is exactly
    invertible, which makes it the right codec for unit tests and tiny smoke runs.
    ``[-1, 1]`` (rather than ``[0, 1]``) centres the signal at zero, the usual
    convention for pixel-space diffusion; its variance is below one, which is fine
    for the small images it is meant for.
    """

    name = "pixel"
    latent_channels = 3
    downsample_factor = 1
    latent_clip = 1.0

    def __init__(self) -> None:
        super().__init__()
        self._freeze()

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2.0 - 1.0

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents + 1.0) * 0.5
