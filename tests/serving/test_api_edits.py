"""`POST /v1/images/edits` through the real `openai` client: results equal the pipeline's, bad input is a 400."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from lmfusion.data.images import to_pil
from lmfusion.sampling import LMFusionPipeline

from serve_helpers import STEPS, http


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def source():
    return to_pil(torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(3)))


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def test_an_edit_is_what_the_pipeline_edits_for_its_seed(client, model, source):
    response = client.images.edit(image=("in.png", _png_bytes(source), "image/png"), prompt="make it blue", n=2,
                                  size="16x16", extra_body={"seed": 4, "guidance_scale": 2.0,
                                                            "image_guidance_scale": 1.5})
    assert [item.model_extra["seed"] for item in response.data] == [4, 5]
    served = [_pixels(item.b64_json) for item in response.data]
    assert np.abs(served[0] - served[1]).max() > 10  # two seeds, two edits
    direct = LMFusionPipeline(model).edit(source, "make it blue", guidance_scale=2.0, image_guidance_scale=1.5,
                                          steps=STEPS, seed=[4, 5], n=2, progress=False)
    for got, want in zip(served, direct):
        assert np.abs(got - np.asarray(want, dtype=np.int16)).max() <= 1


def test_image_guidance_reaches_the_sampler(client, source):
    def edit(scale):
        response = client.images.edit(image=("in.png", _png_bytes(source), "image/png"), prompt="make it blue",
                                      extra_body={"seed": 0, "image_guidance_scale": scale})
        return _pixels(response.data[0].b64_json)

    assert np.abs(edit(1.0) - edit(3.0)).max() > 5


def test_strength_reaches_the_sampler(client, model, source):
    response = client.images.edit(image=("in.png", _png_bytes(source), "image/png"), prompt="make it blue",
                                  size="16x16", extra_body={"seed": 2, "strength": 0.5, "image_guidance_scale": 1.5})
    direct = LMFusionPipeline(model).edit(source, "make it blue", image_guidance_scale=1.5, steps=STEPS, seed=[2],
                                          progress=False, strength=0.5)[0]
    assert np.abs(_pixels(response.data[0].b64_json) - np.asarray(direct, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize("case, match, param", [
    ({"image": b"this is not a png", "prompt": "make it blue"}, "could not be read as an image", "image"),
    ({"image": "png", "prompt": "   "}, "prompt is empty", "prompt"),
    ({"image": "png", "prompt": "make it blue", "n": 0}, "n: Input should be greater than or equal to 1", "n"),
    ({"image": "png", "prompt": "make it blue", "n": 11}, "n: Input should be less than or equal to 10", "n"),
    ({"image": "png", "prompt": "make it blue", "size": "1024x1024"}, "this model draws 16x16", "size"),
    ({"image": "png", "prompt": "make it blue", "response_format": "url"}, "'url' is not supported", "response_format"),
    ({"image": "png", "prompt": "make it blue", "extra_body": {"strength": 0}}, "strength: Input should be greater",
     "strength"),
])
def test_bad_input_is_a_400_naming_the_field(client, source, case, match, param):
    openai = pytest.importorskip("openai")
    case = dict(case)
    if case.get("image") == "png":
        case["image"] = ("in.png", _png_bytes(source), "image/png")
    elif isinstance(case.get("image"), bytes):
        case["image"] = ("in.png", case["image"], "image/png")
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(**case)
    error = caught.value.body
    assert caught.value.status_code == 400 and match in error["message"] and error["param"] == param


def _form(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body built by hand (what a browser's FormData sends)."""
    boundary = "----lmfusion-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    for name, (filename, data) in files.items():
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n")
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_missing_fields_are_a_400_naming_them(server, source):
    """The openai client will not send a request without image or prompt; a hand-made form can."""
    url = f"{server.url}/v1/images/edits"
    body, kind = _form({"prompt": "make it blue"}, {"other": ("x.txt", b"x")})
    status, _, reply = http("POST", url, body, {"Content-Type": kind})
    assert status == 400 and reply["error"]["param"] == "image" and "image is required" in reply["error"]["message"]
    body, kind = _form({}, {"image": ("in.png", _png_bytes(source))})
    status, _, reply = http("POST", url, body, {"Content-Type": kind})
    assert status == 400 and reply["error"]["message"] == "prompt is required"
    body, kind = _form({"prompt": "make it blue", "n": "two"}, {"image": ("in.png", _png_bytes(source))})
    status, _, reply = http("POST", url, body, {"Content-Type": kind})
    assert status == 400 and reply["error"]["param"] == "n"


def test_a_json_body_and_a_mask_are_refused_in_one_line(server, source):
    status, _, body = http("POST", f"{server.url}/v1/images/edits", {"prompt": "make it blue"})
    assert status == 400 and "multipart/form-data" in body["error"]["message"]
    import openai as openai_module

    client = openai_module.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai_module.BadRequestError, match="mask is not supported"):
        client.images.edit(image=("in.png", _png_bytes(source), "image/png"), prompt="make it blue",
                           mask=("mask.png", _png_bytes(source), "image/png"))


def test_waiting_edits_share_a_sampler_call_but_not_with_generations(start_server, model):
    """Each edit of a batch equals the pipeline's edit of its own source and seed."""
    import threading

    from lmfusion.data.images import load_rgb_image
    from lmfusion.serving.worker import ImageWork

    paused = start_server()
    release = threading.Event()
    paused.worker.submit_call(lambda cancelled: release.wait(120))
    sources = [torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    edits = [ImageWork("make it blue", 1, 10, STEPS, 2.0, None, sources[0], 1.5),
             ImageWork("remove the circle", 2, 20, STEPS, 2.0, None, sources[1], 1.5)]
    jobs = [paused.worker.submit_images(work) for work in edits]
    jobs.append(paused.worker.submit_images(ImageWork("a red circle", 1, 1, STEPS, 2.0, None)))
    release.set()
    results = [job.future.result(120) for job in jobs]
    assert [len(images) for images in results] == [1, 2, 1]
    assert paused.worker.stats.batches == 2 and paused.worker.stats.largest_batch == 2
    pipe = LMFusionPipeline(model)
    for work, images in zip(edits, results):
        want = pipe.edit(work.source, work.prompt, 2.0, 1.5, STEPS, [work.seed + k for k in range(work.n)], n=work.n,
                         output="tensor", progress=False)
        for got, expected in zip(images, want):
            assert (load_rgb_image(got, 16) - expected).abs().max() <= 1 / 255 + 1e-6
