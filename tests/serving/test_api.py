"""The OpenAI-compatible API, driven by the real `openai` client against a live server.

What comes back is compared with the sampling functions called directly on the same model:
the server must add transport, not change results.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from lmfusion.data.images import to_pil
from lmfusion.sampling import LMFusionPipeline
from lmfusion.sampling.text import generate_text

from serve_helpers import STEPS, http

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png(b64: str) -> Image.Image:
    data = base64.b64decode(b64)
    assert data.startswith(PNG_SIGNATURE)
    return Image.open(io.BytesIO(data))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def picture():
    generator = torch.Generator().manual_seed(0)
    return to_pil(torch.rand(3, 16, 16, generator=generator))


# ---------------------------------------------------------------------- images
def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["lmfusion"]
    status, _, health = http("GET", f"{server.url}/health")
    assert status == 200 and health["status"] == "ok" and health["image_size"] == 16


def test_images_are_pngs_of_the_model_size_with_consecutive_seeds(client):
    response = client.images.generate(prompt="a red circle", n=2, size="16x16", extra_body={"seed": 11})
    images = [_png(item.b64_json) for item in response.data]
    assert [image.size for image in images] == [(16, 16)] * 2
    assert [item.model_extra["seed"] for item in response.data] == [11, 12]
    assert np.abs(_pixels(images[0]) - _pixels(images[1])).max() > 10  # two seeds, two images


def test_an_image_is_what_generate_image_draws_for_its_seed(client, model):
    response = client.images.generate(prompt="a small blue square", extra_body={"seed": 5, "guidance_scale": 2.0})
    served = _pixels(_png(response.data[0].b64_json))
    direct = LMFusionPipeline(model).generate_image("a small blue square", steps=STEPS, guidance_scale=2.0, seed=5, progress=False)[0]
    assert np.abs(served - _pixels(direct)).max() <= 1  # equal up to rounding to 8 bits


# ---------------------------------------------------------------------- chat
def test_text_chat_equals_generate_text(client, model):
    prompt = "the quick brown fox"
    reply = client.chat.completions.create(model="lmfusion", messages=[{"role": "user", "content": prompt}], max_tokens=12)
    assert reply.choices[0].message.content == generate_text(model, prompt, 12)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1


def test_streaming_yields_the_same_text(client):
    messages = [{"role": "user", "content": "a large green triangle"}]
    whole = client.chat.completions.create(model="lmfusion", messages=messages, max_tokens=12).choices[0].message.content
    stream = client.chat.completions.create(model="lmfusion", messages=messages, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole
    assert sum(1 for piece in pieces if piece) >= 2  # it did arrive in pieces
    assert chunks[-1].usage.completion_tokens >= 1


def test_an_image_and_a_request_to_describe_it_gives_the_caption(client, model, picture):
    content = [{"type": "text", "text": "Describe this image."}, {"type": "image_url", "image_url": {"url": _data_url(picture)}}]
    reply = client.chat.completions.create(model="lmfusion", messages=[{"role": "user", "content": content}], max_tokens=8)
    text = reply.choices[0].message.content
    assert isinstance(text, str) and text == LMFusionPipeline(model).caption(picture, max_new_tokens=8)


def test_a_chat_that_may_draw_answers_in_the_documented_shape(client):
    reply = client.chat.completions.create(
        model="lmfusion", messages=[{"role": "user", "content": "a red circle"}], modalities=["text", "image"],
        max_tokens=8, extra_body={"steps": STEPS},
    )
    message = reply.choices[0].message
    images = (message.model_extra or {}).get("images") or []
    assert isinstance(message.content, str)
    assert message.content.count("[image ") == len(images)


def test_interleaved_parts_become_text_with_markers_and_image_urls(picture):
    from lmfusion.serving.chat import interleaved_message

    message = interleaved_message(["Here:", picture, "done."])
    assert message["content"] == "Here:[image 1]done."
    url = message["images"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert np.array_equal(_pixels(_png(url.split(",", 1)[1])), _pixels(picture))
