"""LMFusionPipeline: the one owner of the model and its codec; the free functions take the codec explicitly."""

import pytest
import torch
from PIL import Image

from lmfusion.codecs.pixel import PixelCodec
from lmfusion.sampling import LMFusionPipeline, caption, generate_image
from lmfusion.sampling import image as image_module


def test_the_pipeline_owns_model_and_codec(peaky_base, pixel_codec):
    from lmfusion.model.lmfusion import LMFusionModel
    from lmfusion.testing import tiny_lmfusion_config

    assert not hasattr(LMFusionModel, "generate_image")  # the model knows nothing of sampling
    model = LMFusionModel.from_text_model(str(peaky_base), tiny_lmfusion_config(str(peaky_base))).eval()
    pipe = LMFusionPipeline(model, codec=pixel_codec)
    assert pipe.model is model and pipe.codec is pixel_codec
    images = pipe.generate_image("a red circle", steps=1, seed=0, n=2, progress=False)
    assert len(images) == 2
    assert isinstance(pipe.caption(torch.rand(3, 16, 16), max_new_tokens=3), str)
    assert isinstance(pipe.generate_text("a red", max_new_tokens=3), str)
    assert all(isinstance(p, (str, Image.Image)) for p in pipe.generate_interleaved("a red", max_new_tokens=3, steps=1, progress=False))


def test_without_a_codec_the_pipeline_builds_the_one_the_model_names(model):
    assert model.config.codec == {"name": "pixel"}
    first, second = LMFusionPipeline(model), LMFusionPipeline(model)
    assert isinstance(first.codec, PixelCodec)
    assert first.codec is not second.codec  # built by its owner, not fetched from a process-wide cache
    assert not hasattr(image_module, "_CODECS") and not hasattr(image_module, "get_codec")


def test_free_functions_take_the_codec_explicitly_and_match_the_pipeline(model, pixel_codec):
    pipe = LMFusionPipeline(model)
    options = dict(steps=2, guidance_scale=2.0, seed=3, output="tensor", progress=False)
    torch.testing.assert_close(pipe.generate_image("a red circle", **options),
                               generate_image(model, "a red circle", codec=pixel_codec, **options), rtol=0, atol=0)
    picture = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert pipe.caption(picture, max_new_tokens=4) == caption(model, picture, max_new_tokens=4, codec=pixel_codec)
    latents = pipe.sample_latents("a red circle", steps=2, seed=3, progress=False)
    assert latents.shape == (1, model.config.latent_channels, model.config.latent_size, model.config.latent_size)
    with pytest.raises(TypeError, match="codec"):
        generate_image(model, "a red circle", steps=1, progress=False)
    with pytest.raises(TypeError, match="codec"):
        caption(model, picture)
