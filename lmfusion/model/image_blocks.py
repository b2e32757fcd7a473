"""Image in/out: U-Net down and up blocks conditioned on the diffusion timestep (paper Eq. 6, 14).

The down block turns a (noisy) latent [N, C, H, W] into H/p * W/p patch tokens of the LM's width,
ordered left-to-right, top-to-bottom. The up block turns the image tokens' final hidden states back
into a noise prediction of the latent's shape, with a long skip connection from the down block's
features (UNet-Up(h, t, h_in)). The papers give no exact layer spec, so this uses diffusers'
ResnetBlock2D / Downsample2D / Upsample2D, with timestep embeddings added inside each resnet.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from torch import nn

from ..config import LMFusionConfig


class TimestepEncoder(nn.Module):
    """Sinusoidal features of t followed by an MLP; shared by the down and up blocks."""

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.features = Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(channels, embed_dim)

    def forward(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(self.features(timesteps).to(dtype))


def _resnet(in_ch: int, out_ch: int, config: LMFusionConfig) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels=in_ch, out_channels=out_ch, temb_channels=config.time_embed_dim, groups=config.unet_norm_groups
    )


class ImageDownBlock(nn.Module):
    """Latent -> patch tokens, plus the feature map of every resolution for the up block's skips."""

    def __init__(self, config: LMFusionConfig, hidden_size: int):
        super().__init__()
        ch = config.unet_channels
        # image_condition "previous" / "residual": the previous image's clean latent as extra input
        # channels (InstructPix2Pix), their weights zero so that the block starts as one without them.
        self.conditioned = config.reads_previous_image
        self.conv_in = nn.Conv2d(config.latent_channels * (2 if self.conditioned else 1), ch, kernel_size=3, padding=1)
        if self.conditioned:
            with torch.no_grad():
                self.conv_in.weight[:, config.latent_channels:].zero_()
        levels = int(math.log2(config.patch_size))
        self.resnets = nn.ModuleList([_resnet(ch, ch, config) for _ in range(levels + 1)])
        self.downsamplers = nn.ModuleList([Downsample2D(ch, use_conv=True, name="op") for _ in range(levels)])
        self.to_tokens = nn.Conv2d(ch, hidden_size, kernel_size=1)
        # config.image_position_embedding "learned": where each patch sits, one vector per patch
        # (row-major, as the tokens). Zero at init, so a model gains it without changing its output.
        self.position = None
        if config.image_position_embedding == "learned":
            self.position = nn.Parameter(torch.zeros(1, config.tokens_per_image, hidden_size))

    def forward(self, latents: torch.Tensor, temb: torch.Tensor,
                conditions: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """conditions: [N, C, H, W] clean latents each image is conditioned on (zeros: none; None: all
        none); read only by a conditioned block."""
        if self.conditioned:
            latents = torch.cat([latents, torch.zeros_like(latents) if conditions is None
                                 else conditions.to(latents.dtype)], dim=1)
        h = self.conv_in(latents)
        skips = []
        for resnet, down in zip(self.resnets, self.downsamplers):
            h = resnet(h, temb)
            skips.append(h)
            h = down(h)
        h = self.resnets[-1](h, temb)
        skips.append(h)
        tokens = self.to_tokens(h).flatten(2).transpose(1, 2)  # [N, h*w, D], row-major
        if self.position is not None:
            tokens = tokens + self.position.to(tokens.dtype)
        return tokens, skips


def residual_input(noisy: torch.Tensor, conditions: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """image_condition "residual": the flow-noised image x_s = (1 - s) x + s n, re-expressed as the
    noised difference (1 - s)(x - c) + s n from its condition c, which is what the blocks read."""
    return noisy - (1 - sigmas) * conditions.to(noisy.dtype)


def residual_output(prediction: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    """The blocks' velocity of the difference, n - (x - c), as the image's own velocity n - x."""
    return prediction - conditions.to(prediction.dtype)


class ImageUpBlock(nn.Module):
    """Final hidden states of image tokens (+ the down block's features) -> predicted noise.

    Skip connections at every resolution, as in a U-Net: the noise to predict has full-resolution
    detail that a patch-level bottleneck alone cannot carry.
    """

    def __init__(self, config: LMFusionConfig, hidden_size: int):
        super().__init__()
        ch = config.unet_channels
        self.side = config.patches_per_side
        # Per-dimension standardisation over all image tokens of the batch (running statistics at
        # inference): the copied layers keep a few huge, nearly constant "massive activation" dims
        # on every image token, and after the final RMSNorm they leave the informative dims ~1% of
        # the vector. Centring and scaling each dim separately gives those dims back their weight.
        self.standardize = nn.BatchNorm1d(hidden_size) if config.readout == "standardize" else None
        self.from_tokens = nn.Conv2d(hidden_size, ch, kernel_size=1)
        levels = int(math.log2(config.patch_size))
        self.merge = _resnet(2 * ch, ch, config)
        self.upsamplers = nn.ModuleList([Upsample2D(ch, use_conv=True) for _ in range(levels)])
        self.resnets = nn.ModuleList([_resnet(2 * ch, ch, config) for _ in range(levels)])
        self.norm_out = nn.GroupNorm(config.unet_norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, config.latent_channels, kernel_size=3, padding=1)
        self.skip_dropout = config.skip_dropout
        # Start by predicting zero noise: the first steps do not fight a random output head.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, hidden: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor) -> torch.Tensor:
        n = hidden.shape[0]
        skips = list(skips)
        if self.training and self.skip_dropout > 0:
            # Per image, all resolutions at once; zeros, not rescaled, as a dropped CFG condition:
            # at inference the skips are always there, a case training saw (1 - p) of the time.
            keep = (torch.rand(n, 1, 1, 1, device=hidden.device) >= self.skip_dropout).to(skips[0].dtype)
            skips = [skip * keep for skip in skips]
        if self.standardize is not None:
            hidden = self.standardize(hidden.reshape(-1, hidden.shape[-1]).float()).to(hidden.dtype).view_as(hidden)
        h = self.from_tokens(hidden.transpose(1, 2).reshape(n, -1, self.side, self.side))
        h = self.merge(torch.cat([h, skips.pop()], dim=1), temb)
        for up, resnet in zip(self.upsamplers, self.resnets):
            h = resnet(torch.cat([up(h), skips.pop()], dim=1), temb)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))
