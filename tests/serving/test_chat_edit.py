"""Chat with an image and an instruction to change it (text-LM base): the reply is the edit."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from lmfusion.data.images import to_pil
from lmfusion.diffusion import DEFAULT_GUIDANCE_SCALE, DEFAULT_IMAGE_GUIDANCE_SCALE
from lmfusion.sampling import LMFusionPipeline
from lmfusion.serving.chat import is_edit_instruction

from serve_helpers import STEPS


@pytest.fixture(scope="module")
def picture():
    return to_pil(torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(7)))


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _message(text: str, *images) -> list[dict]:
    content = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": _data_url(i)}} for i in images]
    return [{"role": "user", "content": content}]


def test_which_texts_are_edit_instructions():
    for text in ("make it blue", "Can you turn the circle into a square?", "move the red circle left",
                 "remove the square", "the triangle should be large", "Please recolour it in green."):
        assert is_edit_instruction(text), text
    for text in ("", "Describe this image.", "What colour is the circle?", "How many shapes are there?", "a cat"):
        assert not is_edit_instruction(text), text


def test_an_image_with_an_edit_instruction_comes_back_edited(client, model, picture):
    reply = client.chat.completions.create(model="lmfusion", messages=_message("make it blue", picture), seed=5)
    message = reply.choices[0].message
    assert message.content == "[image 1]" and reply.choices[0].finish_reason == "stop"
    url = message.model_extra["images"][0]["image_url"]["url"]
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"), dtype=np.int16)
    # the server's defaults: guidance DEFAULT_GUIDANCE_SCALE on the text, DEFAULT_IMAGE_GUIDANCE_SCALE on the image
    direct = LMFusionPipeline(model).edit(picture, "make it blue", guidance_scale=DEFAULT_GUIDANCE_SCALE,
                                          image_guidance_scale=DEFAULT_IMAGE_GUIDANCE_SCALE, steps=STEPS, seed=[5],
                                          progress=False)[0]
    assert np.abs(served - np.asarray(direct, dtype=np.int16)).max() <= 1
    caption = LMFusionPipeline(model).caption(picture, max_new_tokens=8)
    assert not np.array_equal(served, np.asarray(picture, dtype=np.int16)) and message.content != caption


def test_a_question_about_the_image_still_gets_its_caption(client, model, picture):
    reply = client.chat.completions.create(model="lmfusion", messages=_message("What is this?", picture), max_tokens=8)
    assert reply.choices[0].message.content == LMFusionPipeline(model).caption(picture, max_new_tokens=8)


def test_two_images_with_an_edit_instruction_are_a_400(client, picture):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="lmfusion", messages=_message("make it blue", picture, picture))
    assert "edits one image per request" in caught.value.body["message"]
