"""Build a codec from its name, so configs and checkpoints can refer to codecs as plain data."""

from __future__ import annotations

import os
from typing import Any

from .base import ImageCodec
from .diffusers_vae import DiffusersVAECodec
from .pixel import PixelCodec
from .taef2 import TAEF2Codec

CODEC_CLASSES: dict[str, type[ImageCodec]] = {"pixel": PixelCodec, "taef2": TAEF2Codec, "diffusers": DiffusersVAECodec}
CODEC_NAMES = tuple(CODEC_CLASSES)


def latent_clip(name: str) -> float | None:
    """The bound of the named codec's clean latents (see ImageCodec.latent_clip), without loading it."""
    if name not in CODEC_CLASSES:
        raise ValueError(f"unknown codec {name!r}; valid names: {', '.join(CODEC_NAMES)}")
    return CODEC_CLASSES[name].latent_clip


def load_codec(name: str = "pixel", *, path: str | os.PathLike[str] | None = None,
               subfolder: str | None = None) -> ImageCodec:
    """Return the codec called ``name``; ``load_codec(**codec.config())`` round-trips.

    * ``pixel``: no weights (``path``/``subfolder`` must be unset);
    * ``taef2``: ``path`` is the folder with the two ``.pth`` files
      (default: ``$LMFUSION_TAEF2``);
    * ``diffusers``: ``path`` is a folder or hub id of an ``AutoencoderKL``,
      ``subfolder`` e.g. ``"vae"`` inside a full pipeline repository.
    """
    if name == "pixel":
        _reject_unused(name, path=path, subfolder=subfolder)
        return PixelCodec()
    if name == "taef2":
        _reject_unused(name, subfolder=subfolder)
        return TAEF2Codec.from_pretrained(path)
    if name == "diffusers":
        if path is None:
            raise ValueError("codec 'diffusers' needs path= (a local folder or hub id)")
        return DiffusersVAECodec.from_pretrained(path, subfolder=subfolder)
    raise ValueError(f"unknown codec {name!r}; valid names: {', '.join(CODEC_NAMES)}")


def _reject_unused(name: str, **options: Any) -> None:
    """Fail loudly on options the codec ignores, so a typo'd config is not silently accepted."""
    given = sorted(key for key, value in options.items() if value is not None)
    if given:
        raise ValueError(f"codec {name!r} does not take {', '.join(given)}")
