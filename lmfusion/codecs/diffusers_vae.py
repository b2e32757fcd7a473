"""Any diffusers ``AutoencoderKL`` (e.g. ``stabilityai/sd-vae-ft-mse``) as an image codec.

The LMFusion paper uses the Transfusion VAE setting with sd-vae-ft-mse; this
wrapper lets the project use that (or any other KL autoencoder) through the same
:class:`~lmfusion.codecs.base.ImageCodec` interface as the tiny built-in codecs.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .base import ImageCodec


class DiffusersVAECodec(ImageCodec):
    """Wraps ``diffusers.AutoencoderKL``; latents are ``(mean - shift_factor) * scaling_factor``.

    Encoding uses the *mean* of the latent distribution rather than a sample:

    * it is deterministic, so the same image always maps to the same latent
      (cached latents, evaluation and tests are reproducible);
    * the posterior std of these VAEs is tiny compared with the unit-variance
      diffusion noise added in training, so sampling would add nothing useful.

    The scaling factor (and the shift factor where the VAE config defines one)
    bring latents to roughly unit variance, as the diffusion loss expects.
    The VAE works on ``[-1, 1]`` pixels; the conversion from/to ``[0, 1]`` happens here.
    """

    name = "diffusers"

    def __init__(self, vae: torch.nn.Module, path: str | None = None,
                 subfolder: str | None = None) -> None:
        super().__init__()
        self.vae = vae
        self.path = path
        self.subfolder = subfolder
        config = vae.config
        self.latent_channels = int(config.latent_channels)
        self.downsample_factor = 2 ** (len(config.block_out_channels) - 1)
        self.scaling_factor = float(getattr(config, "scaling_factor", None) or 1.0)
        shift = getattr(config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0
        self._freeze()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], subfolder: str | None = None,
                        **kwargs: Any) -> "DiffusersVAECodec":
        """Load ``AutoencoderKL.from_pretrained(path, subfolder=subfolder, **kwargs)``.

        ``path`` is a local folder or a Hugging Face hub id; extra ``kwargs``
        (e.g. ``torch_dtype``) go to diffusers unchanged.
        """
        from diffusers import AutoencoderKL  # lazy: importing diffusers takes seconds

        if subfolder is not None:
            kwargs["subfolder"] = subfolder
        vae = AutoencoderKL.from_pretrained(str(path), **kwargs)
        return cls(vae, path=str(path), subfolder=subfolder)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "subfolder": self.subfolder}

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(images * 2.0 - 1.0).latent_dist
        return (posterior.mean - self.shift_factor) * self.scaling_factor

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        raw = latents / self.scaling_factor + self.shift_factor
        return (self.vae.decode(raw).sample + 1.0) * 0.5
