"""A VLM base (llavafusion): the server answers an image plus a question through the VLM itself."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.sampling.understanding import answer
from lmfusion.serving.app import ServeSettings, create_app
from lmfusion.serving.server import ServerThread
from lmfusion.testing import save_tiny_vlm, tiny_lmfusion_config

from serve_helpers import STEPS


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def vlm_model(tmp_path_factory):
    folder = save_tiny_vlm(tmp_path_factory.mktemp("vlm") / "llava")
    torch.manual_seed(0)
    return LMFusionModel.from_text_model(str(folder), tiny_lmfusion_config(str(folder))).eval()


@pytest.fixture(scope="module")
def vlm_client(vlm_model):
    openai = pytest.importorskip("openai")
    server = ServerThread(create_app(vlm_model, ServeSettings(steps=STEPS)))
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    server.stop()


PICTURE = Image.new("RGB", (40, 28), (200, 30, 40))


def test_the_question_is_read_and_answered_by_the_vlm(vlm_client, vlm_model):
    replies = {}
    for question in ("What colour is the shape?", "Is it small or large?"):
        content = [{"type": "image_url", "image_url": {"url": _data_url(PICTURE)}}, {"type": "text", "text": question}]
        reply = vlm_client.chat.completions.create(model="lmfusion", messages=[{"role": "user", "content": content}],
                                                   max_tokens=12)
        replies[question] = reply.choices[0].message.content
        assert replies[question] == answer(vlm_model, PICTURE, question, max_new_tokens=12)
        assert reply.usage.prompt_tokens > 16  # the image's feature tokens are counted
    assert len(set(replies.values())) == 2, "two questions, one answer: the text was not read"


def test_a_draw_prompt_without_an_image_still_generates(vlm_client):
    reply = vlm_client.chat.completions.create(
        model="lmfusion", messages=[{"role": "user", "content": "Draw a red circle."}], modalities=["text", "image"],
        max_tokens=6)
    assert isinstance(reply.choices[0].message.content, str)
    images = vlm_client.images.generate(model="lmfusion", prompt="a red circle", size="16x16", response_format="b64_json")
    assert Image.open(io.BytesIO(base64.b64decode(images.data[0].b64_json))).size == (16, 16)
