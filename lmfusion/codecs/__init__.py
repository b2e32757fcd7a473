"""Image codecs: frozen autoencoders that turn [0, 1] pixels into diffusion latents and back.

``load_codec(name, path=..., subfolder=...)`` builds one from plain config data;
``codec.config()`` gives that data back.
"""

from .base import ImageCodec
from .diffusers_vae import DiffusersVAECodec
from .pixel import PixelCodec
from .registry import CODEC_NAMES, latent_clip, load_codec
from .taef2 import TAEF2Codec

__all__ = [
    "CODEC_NAMES",
    "DiffusersVAECodec",
    "ImageCodec",
    "PixelCodec",
    "TAEF2Codec",
    "latent_clip",
    "load_codec",
]
