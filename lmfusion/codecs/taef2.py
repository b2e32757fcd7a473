"""TAEF2: a tiny (~1.3M params each way) autoencoder for the FLUX.2 latent space.

The pretrained weights come from the TAESD family (madebyollin/taesd, MIT
licence): ``taef2_encoder.pth`` and ``taef2_decoder.pth``.  This module is our
own definition whose state-dict keys and shapes match those files exactly, so
they load with ``strict=True``.  It maps 64x64 RGB in ``[0, 1]`` to an 8x8x32
latent (8x downsampling, 32 channels) and is fast enough for CPU experiments.

Architecture (indices are the ``nn.Sequential`` positions, i.e. the key prefixes):

* encoder: ``0`` conv 3->64, ``1`` block, ``2`` stride-2 conv (no bias),
  ``3-5`` blocks, ``6`` stride-2 conv, ``7-9`` blocks, ``10`` stride-2 conv,
  ``11-13`` blocks *with* a context branch, ``14`` conv 64->32.
* decoder: ``0`` soft clamp ``tanh(z / 3) * 3``, ``1`` conv 32->64, ``2`` ReLU,
  ``3-5`` blocks with a context branch, then three times
  ``Upsample(x2, nearest)`` + conv (no bias) + blocks (3, 3, 1), and ``19`` conv 64->3.
* block: ``conv3x3-ReLU-conv3x3-ReLU-conv3x3`` plus an identity skip, then ReLU.

The context branch (``pool`` in the checkpoint: 1x1 conv 64->256 without bias,
a 256-channel norm with weight and bias, an activation, 1x1 conv 256->64 without
bias) is not documented by the files, so we determined empirically how it is
applied by loading the weights into each plausible variant (all load strictly)
and measuring the mean round-trip PSNR at 64 px on 48 Fashion-MNIST test images
and on 68 crops of two colour photos:

    variant                                          Fashion   photo crops
    GroupNorm(4), ``x = x + pool(x)`` before block   29.6 dB   25.4 dB  <- used
    GroupNorm(4), added next to the skip             29.6 dB   25.2 dB
    GroupNorm(4), on the spatial mean (SE-like)      29.9 dB   24.7 dB
    per-pixel LayerNorm over channels, before        29.5 dB   23.7 dB
    GroupNorm(1) (norm over C, H, W), before         29.2 dB   23.6 dB
    GroupNorm(2), before                             29.1 dB   20.7 dB
    GroupNorm(8) / (16) / (32), before  (16 images)  27.1 / 25.1 / 23.3 dB
    pool added to the block output      (16 images)  <= 27.7 dB
    multiplicative sigmoid gate         (16 images)  8.6 dB

(BatchNorm is ruled out: the files have no running statistics.  The activation
is ReLU: SiLU / GELU in its place lose 4 / 3 dB on the photo crops.)

GroupNorm with 4 groups is clearly the right norm (the photo crops separate
the norms by 2-5 dB; Fashion-MNIST, mostly flat background, barely does).  Of
the ways to apply it, a residual *before* the block (``x = x + pool(x)``) is
best on the photos, if only by 0.2 dB over adding it next to the skip, and it
is the design of the published TAESD-family code, so that is what we use, in
the three lowest-resolution blocks of the encoder and of the decoder.

Input range: the encoder takes images in ``[0, 1]`` and the decoder returns
``[0, 1]`` (feeding ``[-1, 1]`` gives ~12 dB).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import ImageCodec

ENV_VAR = "LMFUSION_TAEF2"
# The weights shipped with the package (MIT licence, see taef2_weights/README.md): the default.
VENDORED = Path(__file__).resolve().parent / "taef2_weights"
ENCODER_FILE = "taef2_encoder.pth"
DECODER_FILE = "taef2_decoder.pth"

# Raw-latent statistics used to bring ``encode`` to ~zero mean / unit variance:
# mean and std over all elements of ``encoder(images)`` for 1000 Fashion-MNIST
# test images (loaded as in tests/codecs), the same 1000 inverted (dark garment
# on white) and 68 64x64 crops of two colour photos, all RGB in [0, 1].
# Measured (with MEAN=0, STD=1) per set: Fashion-MNIST 0.047 / 0.808, inverted
# 0.033 / 0.806, photos 0.081 / 0.865; equal weight per set 0.053 / 0.827.
# Rounded.  Per-channel statistics vary a lot (means -0.8..0.7, stds 0.3..1.4);
# a single scalar pair keeps the codec simple and the latent space unwarped.
LATENT_MEAN = 0.05
LATENT_STD = 0.82

WIDTH = 64          # feature channels of every block
CONTEXT_WIDTH = 256  # hidden channels of the context branch
CONTEXT_GROUPS = 4   # GroupNorm groups in the context branch (see module docstring)


def _conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """``tanh(z / 3) * 3``: keeps out-of-range latents (e.g. from a sampler) within +-3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3.0) * 3.0


class ContextBranch(nn.Sequential):
    """Pointwise 64->256->64 bottleneck with GroupNorm; its output is added to the block input.

    GroupNorm normalises over space as well as channels, so this branch injects
    per-image (global) statistics into the low-resolution blocks.
    """

    def __init__(self, width: int = WIDTH, hidden: int = CONTEXT_WIDTH,
                 groups: int = CONTEXT_GROUPS) -> None:
        super().__init__(
            nn.Conv2d(width, hidden, kernel_size=1, bias=False),
            nn.GroupNorm(groups, hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, width, kernel_size=1, bias=False),
        )


class ResBlock(nn.Module):
    """Three 3x3 convs with an identity skip and a final ReLU; optional context branch."""

    def __init__(self, width: int = WIDTH, context: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv3x3(width, width), nn.ReLU(),
            _conv3x3(width, width), nn.ReLU(),
            _conv3x3(width, width),
        )
        # Named ``pool`` to match the checkpoint keys.
        self.pool = ContextBranch(width) if context else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return F.relu(self.conv(x) + x)


def _blocks(count: int, width: int, context: bool = False) -> list[nn.Module]:
    return [ResBlock(width, context=context) for _ in range(count)]


def _downsample(width: int) -> nn.Conv2d:
    return _conv3x3(width, width, stride=2, bias=False)


def _upsample(width: int) -> list[nn.Module]:
    return [nn.Upsample(scale_factor=2), _conv3x3(width, width, bias=False)]


def build_encoder(latent_channels: int = 32, width: int = WIDTH) -> nn.Sequential:
    """Image ``[N, 3, H, W]`` in [0, 1] -> raw latent ``[N, C, H/8, W/8]``."""
    return nn.Sequential(
        _conv3x3(3, width), *_blocks(1, width),
        _downsample(width), *_blocks(3, width),
        _downsample(width), *_blocks(3, width),
        _downsample(width), *_blocks(3, width, context=True),
        _conv3x3(width, latent_channels),
    )


def build_decoder(latent_channels: int = 32, width: int = WIDTH) -> nn.Sequential:
    """Raw latent ``[N, C, h, w]`` -> image ``[N, 3, 8h, 8w]`` (roughly [0, 1], unclamped)."""
    return nn.Sequential(
        SoftClamp(), _conv3x3(latent_channels, width), nn.ReLU(),
        *_blocks(3, width, context=True),
        *_upsample(width), *_blocks(3, width),
        *_upsample(width), *_blocks(3, width),
        *_upsample(width), *_blocks(1, width),
        _conv3x3(width, 3),
    )


def _load_state_dict(module: nn.Module, file: Path) -> None:
    """Strictly load a ``.pth`` state dict with ``weights_only=True`` (no pickled code)."""
    if not file.is_file():
        raise FileNotFoundError(
            f"TAEF2 weights not found: {file} is missing (expected {ENCODER_FILE} and "
            f"{DECODER_FILE} in that folder; set {ENV_VAR} or pass path=)")
    state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a state dict, got {type(state).__name__}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{file} does not match the TAEF2 architecture: {error}") from error


class TAEF2Codec(ImageCodec):
    """Tiny FLUX.2-space autoencoder: 3x64x64 in [0, 1] <-> 32x8x8, ~unit variance.

    ``TAEF2Codec()`` has random weights (useful to check architecture only);
    use :meth:`from_pretrained` for the real codec.
    """

    name = "taef2"
    latent_channels = 32
    downsample_factor = 8
    # Measured on 3,800 shapes images (64 px): |latent| has 99th / 99.9th percentiles 2.7 / 4.4
    # (max 8.7), and the decoder's soft clamp (tanh(z / 3) * 3 on the raw latent) flattens values
    # beyond about +-3.6 here. Samplers clip their clean-latent estimates to this bound.
    latent_clip = 4.5

    def __init__(self) -> None:
        super().__init__()
        self.encoder = build_encoder(self.latent_channels)
        self.decoder = build_decoder(self.latent_channels)
        self.path: str | None = None
        self._freeze()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str] | None = None) -> "TAEF2Codec":
        """Load from a folder holding ``taef2_encoder.pth`` and ``taef2_decoder.pth``.

        ``path`` defaults to the environment variable ``LMFUSION_TAEF2``, else to the weights
        shipped with lmfusion (``taef2_weights/``). The shipped weights are recorded as
        ``path: None`` in configs, so a checkpoint does not pin this machine's install folder.
        """
        if path is None:
            path = os.environ.get(ENV_VAR) or VENDORED
        folder = Path(path).expanduser()
        codec = cls()
        _load_state_dict(codec.encoder, folder / ENCODER_FILE)
        _load_state_dict(codec.decoder, folder / DECODER_FILE)
        codec.path = None if folder.resolve() == VENDORED else str(folder.resolve())
        codec._freeze()
        return codec

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path}

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return (self.encoder(images) - LATENT_MEAN) / LATENT_STD

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents * LATENT_STD + LATENT_MEAN)
