"""load_rgb_image / to_pil / save_image_grid on generated assets (nothing from the repo)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lmfusion.data.images import (
    BadImageError,
    load_rgb_image,
    make_grid,
    save_image_grid,
    to_pil,
    verify_image,
)


def png_bytes(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def assert_image_tensor(tensor: torch.Tensor, size: int) -> None:
    assert tensor.shape == (3, size, size)
    assert tensor.dtype == torch.float32
    assert 0.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0


def test_rgb_from_path_bytes_and_pil_agree(tmp_path: Path) -> None:
    array = np.random.default_rng(0).integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    path = tmp_path / "noise.png"
    image.save(path)
    from_path = load_rgb_image(path, 20)
    from_str = load_rgb_image(str(path), 20)
    from_bytes = load_rgb_image(path.read_bytes(), 20)
    from_pil = load_rgb_image(image, 20)
    assert_image_tensor(from_path, 20)
    for other in (from_str, from_bytes, from_pil):
        assert torch.equal(from_path, other)
    # Same size: no resampling, so pixels survive exactly.
    assert torch.equal(from_path, torch.from_numpy(array).permute(2, 0, 1).float() / 255)


def test_rgba_is_composited_over_white() -> None:
    array = np.zeros((8, 8, 4), dtype=np.uint8)
    array[..., 0] = 255  # red everywhere...
    array[:, :4, 3] = 0  # ...fully transparent on the left half
    array[:, 4:, 3] = 255  # ...opaque on the right half
    tensor = load_rgb_image(Image.fromarray(array, mode="RGBA"), 8)
    assert torch.allclose(tensor[:, :, :3], torch.ones(3, 8, 3), atol=1 / 255)
    assert torch.allclose(tensor[:, :, 5:], torch.tensor([1.0, 0, 0])[:, None, None].expand(3, 8, 3),
                          atol=1 / 255)


def test_half_transparent_black_becomes_grey() -> None:
    image = Image.new("LA", (4, 4), (0, 128))
    tensor = load_rgb_image(png_bytes(image), 4)
    assert torch.allclose(tensor, torch.full((3, 4, 4), 127 / 255), atol=2 / 255)


def test_palette_with_transparency_uses_white() -> None:
    image = Image.new("P", (6, 6), 0)
    image.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    image.info["transparency"] = 0
    data = png_bytes(image, transparency=0)
    tensor = load_rgb_image(data, 6)
    assert torch.allclose(tensor, torch.ones(3, 6, 6), atol=1 / 255)


def test_greyscale_and_bilevel_and_cmyk_become_rgb() -> None:
    grey = load_rgb_image(png_bytes(Image.new("L", (5, 5), 100)), 5)
    assert torch.allclose(grey, torch.full((3, 5, 5), 100 / 255))
    bilevel = load_rgb_image(png_bytes(Image.new("1", (5, 5), 1)), 5)
    assert torch.allclose(bilevel, torch.ones(3, 5, 5))
    cmyk = load_rgb_image(png_bytes(Image.new("CMYK", (5, 5), (0, 255, 255, 0)), "JPEG",
                                    quality=100), 5)
    assert cmyk[0].mean() > 0.8 and cmyk[1].mean() < 0.2 and cmyk[2].mean() < 0.2


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    array = np.full((4, 4), 32896, dtype=np.uint16)  # 32896 / 65535 ~= 128 / 255
    array[0, 0] = 65535
    path = tmp_path / "deep.png"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode.startswith("I")  # really a 16-bit file
    tensor = load_rgb_image(path, 4)
    assert abs(float(tensor[0, 2, 2]) - 128 / 255) < 1.5 / 255
    assert float(tensor[0, 0, 0]) == 1.0


def test_odd_size_is_resized_on_short_side_and_center_cropped() -> None:
    # 37 wide, 81 tall: red top, green middle, blue bottom.  The centre square is green.
    array = np.zeros((81, 37, 3), dtype=np.uint8)
    array[:22, :, 0] = 255
    array[22:59, :, 1] = 255
    array[59:, :, 2] = 255
    tensor = load_rgb_image(png_bytes(Image.fromarray(array)), 16)
    assert_image_tensor(tensor, 16)
    assert tensor[1].min() > 0.9 and tensor[0].max() < 0.1 and tensor[2].max() < 0.1
    wide = load_rgb_image(Image.new("RGB", (81, 37), (10, 20, 30)), 24)
    assert_image_tensor(wide, 24)


def test_exif_orientation_is_applied() -> None:
    array = np.zeros((10, 20, 3), dtype=np.uint8)
    array[:, :10] = (255, 0, 0)  # left red, right blue
    array[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = png_bytes(Image.fromarray(array), "JPEG", quality=95, exif=exif.tobytes())
    tensor = load_rgb_image(data, 10)  # displayed 10 wide x 20 tall: red on top
    assert tensor[0, :3].mean() > 0.8 and tensor[2, -3:].mean() > 0.8


@pytest.mark.parametrize("content, reason", [
    (b"", "empty_file"),
    (b"this is not an image at all", "corrupt"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt"),
])
def test_broken_files_raise_bad_image_error(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(BadImageError) as info:
        load_rgb_image(path, 8)
    assert info.value.reason == reason
    assert str(path) in str(info.value) and reason in str(info.value)
    assert isinstance(info.value, ValueError)


def test_truncated_png_is_reported_as_truncated(tmp_path: Path) -> None:
    noise = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noise))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    for check in (lambda: load_rgb_image(path, 8), lambda: verify_image(path)):
        with pytest.raises(BadImageError) as info:
            check()
        assert info.value.reason == "truncated" and "cut.png" in str(info.value)


def test_missing_file_and_zero_size_image(tmp_path: Path) -> None:
    with pytest.raises(BadImageError) as info:
        load_rgb_image(tmp_path / "nope.png", 8)
    assert info.value.reason == "missing_file"
    with pytest.raises(BadImageError) as info:
        load_rgb_image(Image.new("RGB", (0, 5)), 8)
    assert info.value.reason == "zero_size"
    with pytest.raises(ValueError):
        load_rgb_image(Image.new("RGB", (4, 4)), 0)


def test_verify_image_accepts_good_files(tmp_path: Path) -> None:
    path = tmp_path / "ok.jpg"
    Image.new("RGB", (7, 3), "white").save(path)
    assert verify_image(path) == (7, 3)
    assert verify_image(path.read_bytes()) == (7, 3)


def test_to_pil_roundtrip_and_shapes() -> None:
    tensor = torch.rand(3, 9, 7)
    image = to_pil(tensor)
    assert image.mode == "RGB" and image.size == (7, 9)
    back = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    assert (back - tensor).abs().max() <= 0.5 / 255 + 1e-6
    # 7x9 at size 7: the centre 7x7 crop (rows 1..7), with no resampling at all.
    assert torch.allclose(load_rgb_image(image, 7), back[:, 1:8], atol=1e-6)
    assert to_pil(torch.rand(1, 4, 4)).mode == "L"
    assert to_pil(torch.full((3, 2, 2), 7.0)).getpixel((0, 0)) == (255, 255, 255)  # clamped
    with pytest.raises(ValueError):
        to_pil(torch.rand(4, 2, 2))


def test_save_image_grid_writes_atomically(tmp_path: Path) -> None:
    images = torch.zeros(5, 3, 8, 8)
    target = tmp_path / "sub" / "grid.png"
    target.parent.mkdir()
    target.write_bytes(b"old")
    assert save_image_grid(images, target, nrow=3, padding=2) == target
    grid = Image.open(target)
    assert grid.size == (3 * 10 + 2, 2 * 10 + 2)
    assert grid.getpixel((0, 0)) == (255, 255, 255) and grid.getpixel((2, 2)) == (0, 0, 0)
    assert sorted(p.name for p in target.parent.iterdir()) == ["grid.png"]  # no temp leftovers
    assert make_grid([torch.ones(3, 4, 4)], nrow=8).shape == (3, 8, 8)
