"""Image loading and saving: anything PIL can open in, clean ``[3, size, size]`` tensors out.

Training data in the wild is messy (RGBA logos, 16-bit scans, CMYK JPEGs, truncated
downloads).  Every reader in :mod:`lmfusion.data` funnels images through
:func:`load_rgb_image` so the model only ever sees one layout, and every failure is a
:class:`BadImageError` carrying a machine-readable ``reason`` the readers can count.
"""

from __future__ import annotations

import io
import os
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..utils import atomic_write_bytes

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]

WHITE = (255, 255, 255)


class BadImageError(ValueError):
    """An image source that cannot be turned into pixels.

    ``reason`` is one of ``missing_file``, ``empty_file``, ``corrupt``, ``truncated``,
    ``zero_size`` or ``too_large`` so that readers can keep per-reason skip counts.
    """

    def __init__(self, name: str, reason: str, detail: str = "") -> None:
        self.name = name
        self.reason = reason
        self.detail = detail
        message = f"bad image {name}: {reason}" + (f" ({detail})" if detail else "")
        super().__init__(message)


def _source_name(source: ImageSource) -> str:
    """A short human label for error messages (the path, or what kind of object it was)."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, Image.Image):
        return f"<PIL {source.mode} {source.width}x{source.height}>"
    return f"<{len(source)} bytes>"


@contextmanager
def _decode_errors(name: str) -> Iterator[None]:
    """Translate the zoo of PIL decode exceptions into one :class:`BadImageError`."""
    try:
        yield
    except BadImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise BadImageError(name, "too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise BadImageError(name, "corrupt", "not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise BadImageError(name, reason, str(exc) or type(exc).__name__) from exc


def _open(source: ImageSource, name: str) -> Image.Image:
    """Open and fully decode ``source`` so that truncation surfaces here, not later."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise BadImageError(name, "missing_file")
        if path.stat().st_size == 0:
            raise BadImageError(name, "empty_file")
        data = path.read_bytes()
    else:
        data = bytes(source)
        if not data:
            raise BadImageError(name, "empty_file")
    with _decode_errors(name):
        image = Image.open(io.BytesIO(data))
        image.load()
    return image


def verify_image(source: str | os.PathLike | bytes) -> tuple[int, int]:
    """Cheap integrity check (header + PIL ``verify()``) that does not decode pixels.

    Used by the map-style readers at construction so that broken files are skipped up
    front instead of surfacing mid-epoch.  Returns ``(width, height)``.
    """
    name = _source_name(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise BadImageError(name, "missing_file")
        if path.stat().st_size == 0:
            raise BadImageError(name, "empty_file")
        stream: io.IOBase = open(path, "rb")
    else:
        if not source:
            raise BadImageError(name, "empty_file")
        stream = io.BytesIO(bytes(source))
    with stream:
        with _decode_errors(name), Image.open(stream) as image:
            width, height = image.size
            image.verify()
    if width == 0 or height == 0:
        raise BadImageError(name, "zero_size", f"{width}x{height}")
    return width, height


def _has_alpha(image: Image.Image) -> bool:
    """True when the image carries any transparency that must be flattened."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite over white: transparent pixels would otherwise turn into arbitrary colours."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float greyscale into 8 bits (PIL's convert would clip)."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        values = values / 65535.0
    elif image.mode == "F" and values.size and values.max() <= 1.0:
        pass  # already a [0, 1] float image
    else:
        peak = values.max() if values.size else 0.0
        values = values / (255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak)
    grey = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, flattening transparency onto white."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if _has_alpha(image):
        return _flatten_alpha(image)
    if image.mode.startswith("I") or image.mode == "F":
        return _high_bit_depth_to_rgb(image)
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Scale the short side to ``size`` and take the centre square (as in the paper).

    Cropping is done through ``resize(box=...)`` so there is a single (antialiased
    bicubic) resampling step and no rounding drift between resize and crop.
    """
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2.0, (height - side) / 2.0
    box = (left, top, left + side, top + side)
    return image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=None)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image to a float ``[3, H, W]`` tensor in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0).contiguous()


def load_rgb_image(source: ImageSource, size: int) -> torch.Tensor:
    """Load ``source`` (path, encoded bytes or PIL image) as a ``[3, size, size]`` tensor in [0, 1].

    Raises :class:`BadImageError` naming the file and the problem for anything that does
    not decode to a non-empty image, so callers can skip and count instead of crashing.
    """
    return pil_to_tensor(load_rgb_pil(source, size))


def load_rgb_pil(source: ImageSource, size: int) -> Image.Image:
    """:func:`load_rgb_image` stopping at the ``size x size`` RGB PIL image.

    For dataset preparation, which writes PNGs and need not round-trip through a tensor.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    return resize_center_crop(open_rgb_pil(source), size)


def open_rgb_pil(source: ImageSource) -> Image.Image:
    """``source`` decoded, upright and RGB at its own size (for a VLM's processor, which resizes
    in its own way); bad input raises :class:`BadImageError` as :func:`load_rgb_image` does."""
    name = _source_name(source)
    image = _open(source, name)
    if image.width == 0 or image.height == 0:
        raise BadImageError(name, "zero_size", f"{image.width}x{image.height}")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not cost us the pixels
        pass
    return to_rgb(image)


def to_pil(image: torch.Tensor) -> Image.Image:
    """A ``[3, H, W]``, ``[1, H, W]`` or ``[H, W]`` tensor in [0, 1] to a PIL image (clamped)."""
    tensor = image.detach().to("cpu", torch.float32)
    if tensor.dim() == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() not in (2, 3) or (tensor.dim() == 3 and tensor.shape[0] != 3):
        raise ValueError(f"expected [3,H,W], [1,H,W] or [H,W], got {tuple(tensor.shape)}")
    # +0.5 then truncate == round for non-negative values (and avoids a slow torch.round).
    array = tensor.clamp(0, 1).mul(255).add(0.5).to(torch.uint8)
    if array.dim() == 3:
        array = array.permute(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(array.numpy()))


def make_grid(images: torch.Tensor | Sequence[torch.Tensor], nrow: int = 8,
              padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile ``N`` images of shape ``[3, H, W]`` into one ``[3, H', W']`` tensor, ``nrow`` per row."""
    batch = torch.stack(list(images)) if not isinstance(images, torch.Tensor) else images
    if batch.dim() != 4 or batch.shape[1] not in (1, 3):
        raise ValueError(f"expected [N,3,H,W], got {tuple(batch.shape)}")
    batch = batch.detach().to("cpu", torch.float32).expand(-1, 3, -1, -1)
    count, _, height, width = batch.shape
    ncol = max(1, min(nrow, count))
    nrows = max(1, -(-count // ncol))
    grid = torch.full((3, nrows * (height + padding) + padding,
                       ncol * (width + padding) + padding), float(pad_value))
    for index in range(count):
        row, col = divmod(index, ncol)
        top, left = padding + row * (height + padding), padding + col * (width + padding)
        grid[:, top:top + height, left:left + width] = batch[index]
    return grid


def save_image_grid(images: torch.Tensor | Sequence[torch.Tensor], path: str | os.PathLike,
                    nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> Path:
    """Write a PNG contact sheet atomically (temp file + ``os.replace``).

    Atomic so that a viewer or a concurrent evaluation never reads a half-written file.
    """
    target = Path(path)
    buffer = io.BytesIO()
    to_pil(make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)).save(buffer, format="PNG")
    atomic_write_bytes(target, buffer.getvalue())
    return target
