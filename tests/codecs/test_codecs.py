"""Tests for lmfusion.codecs: interface checks, pixel/TAEF2/diffusers round trips, registry.

TAEF2 tests need the pretrained files (``../shared/taef2`` next to the repo, or
``$LMFUSION_TAEF2``) and real images (Fashion-MNIST from the Debian package
``dataset-fashion-mnist``); they skip with the reason when either is absent.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lmfusion.codecs import (DiffusersVAECodec, ImageCodec, PixelCodec, TAEF2Codec,
                             load_codec)

REPO_ROOT = Path(__file__).resolve().parents[2]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
TAEF2_FILES = ("taef2_encoder.pth", "taef2_decoder.pth")


def psnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean per-image PSNR in dB for images in [0, 1]."""
    mse = (reference - other).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1.0 / mse)).mean())


def read_fashion_mnist(path: Path, count: int, size: int = 64) -> torch.Tensor:
    """First ``count`` images of a gzipped IDX file, bicubic-upscaled to ``size`` RGB in [0, 1]."""
    with gzip.open(path, "rb") as stream:
        data = stream.read()
    assert int.from_bytes(data[:4], "big") == 2051, "not an IDX image file"
    n, rows, cols = (int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(3))
    pixels = np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols)[:count]
    rgb = [np.asarray(Image.fromarray(p).convert("RGB").resize((size, size), Image.BICUBIC))
           for p in pixels]
    return torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float() / 255.0


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def taef2(taef2_dir: Path) -> TAEF2Codec:
    return TAEF2Codec.from_pretrained(taef2_dir)


@pytest.fixture(scope="module")
def fashion_images() -> torch.Tensor:
    if not FASHION_MNIST.is_file():
        pytest.skip(f"{FASHION_MNIST} missing (apt-get install dataset-fashion-mnist)")
    return read_fashion_mnist(FASHION_MNIST, count=16)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised, tiny AutoencoderKL saved like a hub checkpoint (in ``vae/``)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        sample_size=32, scaling_factor=0.5, shift_factor=0.25,
    )
    root = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(root / "vae")
    return root


# ------------------------------------------------------------ pixel codec
def test_pixel_round_trip_is_exact() -> None:
    images = torch.randint(0, 256, (2, 3, 8, 12)).float() / 255.0
    codec = PixelCodec()
    latents = codec.encode(images)
    assert torch.equal(latents, images * 2 - 1)
    restored = codec.decode(latents)
    torch.testing.assert_close(restored, images, rtol=0, atol=1e-7)
    assert torch.equal((restored * 255).round(), (images * 255).round())


def test_pixel_shapes_dtype_and_config() -> None:
    codec = PixelCodec()
    images = torch.rand(1, 3, 5, 7, dtype=torch.float64)
    latents = codec.encode(images)
    assert latents.shape == (1, 3, 5, 7) and latents.dtype == torch.float64
    assert codec.latent_shape(16) == (3, 16, 16)
    assert codec.latent_shape((5, 7)) == (3, 5, 7)
    assert codec.config() == {"name": "pixel"}
    assert isinstance(load_codec(**codec.config()), PixelCodec)


def test_decode_clamps_to_unit_range() -> None:
    out = PixelCodec().decode(torch.tensor([-3.0, 0.0, 3.0]).view(1, 3, 1, 1))
    assert out.flatten().tolist() == [0.0, 0.5, 1.0]


# --------------------------------------------------------------- bad input
@pytest.mark.parametrize("images, message", [
    (torch.rand(3, 64, 64), "4D"),
    (torch.rand(1, 1, 64, 64), "3 channels"),
    (torch.rand(1, 4, 64, 64), "3 channels"),
    (torch.randint(0, 255, (1, 3, 64, 64)), "float"),
    (torch.rand(1, 3, 60, 64), "divisible by the downsample factor 8"),
    (torch.rand(1, 3, 64, 12), "divisible"),
])
def test_encode_rejects_bad_images(images: torch.Tensor, message: str) -> None:
    codec = TAEF2Codec()  # random weights: only the checks matter here
    with pytest.raises(ValueError, match=message):
        codec.encode(images)


def test_decode_and_latent_shape_reject_bad_input() -> None:
    codec = TAEF2Codec()
    with pytest.raises(ValueError, match="32"):
        codec.decode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="4D"):
        codec.decode(torch.zeros(32, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        codec.latent_shape(30)
    assert codec.latent_shape((64, 128)) == (32, 8, 16)


def test_codecs_are_frozen() -> None:
    codec = TAEF2Codec()
    assert isinstance(codec, ImageCodec)
    assert not any(p.requires_grad for p in codec.parameters())
    codec.train()  # a parent model calling .train() must not unfreeze the codec
    assert not codec.training and not any(m.training for m in codec.modules())
    images = torch.rand(1, 3, 16, 16, requires_grad=True)
    assert not codec.encode(images).requires_grad


# ----------------------------------------------------------------- registry
def test_load_codec_rejects_unknown_names_and_options() -> None:
    with pytest.raises(ValueError, match="pixel, taef2, diffusers"):
        load_codec("vqgan")
    with pytest.raises(ValueError, match="path"):
        load_codec("pixel", path="/nowhere")
    with pytest.raises(ValueError, match="path"):
        load_codec("diffusers")


# -------------------------------------------------------------------- TAEF2
def test_taef2_missing_files_error_names_the_file(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="taef2_encoder.pth"):
        TAEF2Codec.from_pretrained(tmp_path)
    monkeypatch.setenv("LMFUSION_TAEF2", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_codec("taef2")


def test_taef2_shipped_weights_are_the_default_and_stay_portable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The package ships the MIT-licensed weights: no path, no env var, no download needed."""
    from lmfusion.codecs.taef2 import VENDORED

    monkeypatch.delenv("LMFUSION_TAEF2", raising=False)
    codec = load_codec("taef2")
    assert codec.config() == {"name": "taef2", "path": None}  # no install folder in checkpoints
    assert (VENDORED / "LICENSE").is_file() and (VENDORED / "README.md").is_file()
    shared = REPO_ROOT.parent / "shared" / "taef2"
    if shared.is_dir():  # the vendored files are the upstream ones, byte for byte
        for name in TAEF2_FILES:
            assert (VENDORED / name).read_bytes() == (shared / name).read_bytes()


def test_taef2_state_dict_matches_checkpoint_exactly(taef2_dir: Path) -> None:
    codec = TAEF2Codec()
    for module, filename in ((codec.encoder, TAEF2_FILES[0]), (codec.decoder, TAEF2_FILES[1])):
        state = torch.load(taef2_dir / filename, map_location="cpu", weights_only=True)
        ours = module.state_dict()
        assert list(ours) == list(state), filename  # same keys, same order
        assert all(ours[k].shape == state[k].shape for k in state), filename
        module.load_state_dict(state, strict=True)


def test_taef2_round_trip_on_real_images(taef2: TAEF2Codec,
                                         fashion_images: torch.Tensor) -> None:
    latents = taef2.encode(fashion_images)
    assert latents.shape == (16, 32, 8, 8) and latents.dtype == torch.float32
    assert taef2.latent_shape(64) == tuple(latents.shape[1:])
    # the per-codec shift/scale brings latents near zero mean / unit variance
    assert abs(float(latents.mean())) < 0.5 and 0.5 < float(latents.std()) < 2.0
    restored = taef2.decode(latents)
    assert restored.shape == fashion_images.shape
    assert 0.0 <= float(restored.min()) and float(restored.max()) <= 1.0
    assert psnr(fashion_images, restored) > 24.0


def test_taef2_config_round_trip_and_env_var(taef2: TAEF2Codec, taef2_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    images = torch.rand(2, 3, 16, 24)
    rebuilt = load_codec(**taef2.config())
    assert rebuilt.config() == taef2.config()
    torch.testing.assert_close(rebuilt.encode(images), taef2.encode(images))
    monkeypatch.setenv("LMFUSION_TAEF2", str(taef2_dir))
    assert isinstance(load_codec("taef2"), TAEF2Codec)


# ---------------------------------------------------------- diffusers VAE
def test_diffusers_vae_codec(tiny_vae_dir: Path) -> None:
    codec = load_codec("diffusers", path=str(tiny_vae_dir), subfolder="vae")
    assert isinstance(codec, DiffusersVAECodec)
    assert (codec.latent_channels, codec.downsample_factor) == (4, 2)
    assert (codec.scaling_factor, codec.shift_factor) == (0.5, 0.25)
    assert not any(p.requires_grad for p in codec.parameters())

    torch.manual_seed(1)
    images = torch.rand(2, 3, 16, 16)
    latents = codec.encode(images)
    assert latents.shape == (2, 4, 8, 8) == (2, *codec.latent_shape(16))
    with torch.no_grad():  # deterministic: the posterior mean, shifted then scaled
        mean = codec.vae.encode(images * 2 - 1).latent_dist.mean
    torch.testing.assert_close(latents, (mean - 0.25) * 0.5)
    torch.testing.assert_close(codec.encode(images), latents)

    restored = codec.decode(latents)
    assert restored.shape == images.shape
    assert 0.0 <= float(restored.min()) and float(restored.max()) <= 1.0
    with torch.no_grad():
        expected = (codec.vae.decode(mean).sample + 1) / 2
    torch.testing.assert_close(restored, expected.clamp(0, 1))

    config = codec.config()
    assert config == {"name": "diffusers", "path": str(tiny_vae_dir), "subfolder": "vae"}
    torch.testing.assert_close(load_codec(**config).encode(images), latents)
