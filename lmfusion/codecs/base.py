"""The image codec interface: pixels in [0, 1] <-> diffusion-ready latents.

LMFusion never sees pixels inside the transformer: images enter and leave as
latents of a frozen autoencoder.  Every codec (identity ``pixel``, the tiny
``taef2`` autoencoder, any diffusers ``AutoencoderKL``) implements this one
interface so the model, the data pipeline and the samplers stay codec-agnostic.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ImageSize = int | tuple[int, int]


class ImageCodec(nn.Module):
    """A frozen image autoencoder.

    Subclasses set :attr:`latent_channels`, :attr:`downsample_factor` and
    :attr:`name`, and implement :meth:`_encode` / :meth:`_decode` on already
    validated tensors.  The public :meth:`encode` / :meth:`decode` add the input
    checks, ``torch.no_grad`` and the dtype/device handling, so every codec
    fails the same way on bad input.

    Contract:

    * ``encode(images)``: float ``[N, 3, H, W]`` in ``[0, 1]`` ->
      ``[N, C, H/f, W/f]`` scaled to roughly zero mean and unit variance, so that
      diffusion noise ``N(0, I)`` has the right scale relative to the signal.
    * ``decode(latents)``: the inverse, returning images in ``[0, 1]`` (clamped).

    The weights are frozen: ``requires_grad`` is off and the module stays in eval
    mode even when a parent model calls ``.train()`` (a codec must behave the same
    during training and sampling).
    """

    latent_channels: int
    downsample_factor: int
    name: str
    # Clean latents lie in [-latent_clip, latent_clip] (None: no known bound). Samplers clip their
    # estimate of the clean latent to it, as DDPM does in pixel space: an undertrained model's
    # estimates at high noise are far off, and unclipped they compound over the steps.
    latent_clip: float | None = None

    # ------------------------------------------------------------------ public API
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[N, 3, H, W]`` in ``[0, 1]`` -> latents ``[N, C, H/f, W/f]``."""
        self._check_images(images)
        with torch.no_grad():
            latents = self._encode(self._to_codec(images))
        return latents.to(images.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[N, C, h, w]`` -> images ``[N, 3, h*f, w*f]`` clamped to ``[0, 1]``."""
        self._check_latents(latents)
        with torch.no_grad():
            images = self._decode(self._to_codec(latents))
        return images.clamp(0.0, 1.0).to(latents.dtype)

    def latent_shape(self, image_size: ImageSize) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latent of one image of ``image_size`` (side or ``(H, W)``)."""
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        self._check_spatial(int(height), int(width))
        f = self.downsample_factor
        return self.latent_channels, int(height) // f, int(width) // f

    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings; ``load_codec(**codec.config())`` rebuilds the codec."""
        return {"name": self.name}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Round trip (encode then decode); handy for quick checks."""
        return self.decode(self.encode(images))

    def train(self, mode: bool = True) -> "ImageCodec":
        """Ignore ``mode``: a frozen codec always stays in eval mode."""
        return super().train(False)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, latent_channels={self.latent_channels}, "
                f"downsample_factor={self.downsample_factor}")

    # --------------------------------------------------------- subclass hooks
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _freeze(self) -> None:
        """Turn off gradients and switch to eval mode; call at the end of ``__init__``."""
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.eval()

    # ---------------------------------------------------------------- helpers
    def _to_codec(self, tensor: torch.Tensor) -> torch.Tensor:
        """Move input to the codec's device and dtype (no-op for weightless codecs)."""
        parameter = next(self.parameters(), None)
        if parameter is None:
            return tensor
        return tensor.to(device=parameter.device, dtype=parameter.dtype)

    def _check_spatial(self, height: int, width: int) -> None:
        f = self.downsample_factor
        if height <= 0 or width <= 0 or height % f or width % f:
            raise ValueError(
                f"{self.name} codec: image size {height}x{width} must be positive and "
                f"divisible by the downsample factor {f}")

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise ValueError(f"{self.name} codec: images must be a float tensor, got "
                             f"{getattr(images, 'dtype', type(images).__name__)}")
        if images.dim() != 4:
            raise ValueError(f"{self.name} codec: images must be 4D [N, 3, H, W], got "
                             f"shape {tuple(images.shape)}")
        if images.shape[1] != 3:
            raise ValueError(f"{self.name} codec: images must have 3 channels (RGB), got "
                             f"{images.shape[1]} in shape {tuple(images.shape)}")
        self._check_spatial(images.shape[2], images.shape[3])

    def _check_latents(self, latents: torch.Tensor) -> None:
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise ValueError(f"{self.name} codec: latents must be a float tensor, got "
                             f"{getattr(latents, 'dtype', type(latents).__name__)}")
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"{self.name} codec: latents must be 4D [N, {self.latent_channels}, h, w], "
                f"got shape {tuple(latents.shape)}")
        if latents.shape[2] <= 0 or latents.shape[3] <= 0:
            raise ValueError(f"{self.name} codec: empty latent grid {tuple(latents.shape)}")
