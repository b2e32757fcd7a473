"""Every bad request gets OpenAI's error shape and the right status; busy and auth paths too."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from serve_helpers import http

openai = pytest.importorskip("openai")

RED = {"model": "lmfusion", "messages": [{"role": "user", "content": "a red circle"}]}


def _assert_error(status, body, expected_status, fragment):
    assert status == expected_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert fragment in error["message"], error["message"]
    assert "Traceback" not in error["message"]


@pytest.mark.parametrize("path, body, fragment", [
    ("images/generations", {"prompt": ""}, "prompt is empty"),
    ("images/generations", {"prompt": "   "}, "prompt is empty"),
    ("images/generations", {"prompt": "red circle " * 400}, "at most"),
    ("images/generations", {"prompt": "x", "n": 0}, "n:"),
    ("images/generations", {"prompt": "x", "n": 11}, "n:"),
    ("images/generations", {"prompt": "x", "size": "1024x1024"}, "16x16"),
    ("images/generations", {"prompt": "x", "model": "dall-e-3"}, "unknown model"),
    ("images/generations", {"prompt": "x", "response_format": "url"}, "b64_json"),
    ("images/generations", {"prompt": "x", "steps": 0}, "steps"),
    ("images/generations", {"prompt": "x", "scheduler": "karras"}, "scheduler"),
    ("images/generations", {}, "prompt is required"),
    ("chat/completions", {**RED, "model": "gpt-4o"}, "unknown model"),
    ("chat/completions", {"model": "lmfusion", "messages": []}, "messages"),
    ("chat/completions", {"model": "lmfusion", "messages": [{"role": "user", "content": ""}]}, "empty"),
    ("chat/completions", {"model": "lmfusion", "messages": [{"role": "system", "content": "hi"}]}, "user message"),
    ("chat/completions", {"model": "lmfusion", "messages": [{"role": "tool", "content": "x"}]}, "role"),
    ("chat/completions", {**RED, "temperature": -1}, "temperature"),
    ("chat/completions", {**RED, "n": 2}, "n:"),
    ("chat/completions", {**RED, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat/completions", {"model": "lmfusion", "messages": [{"role": "user", "content": "red circle " * 600}]}, "tokens"),
    ("chat/completions", {"model": "lmfusion", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]}, "could not be decoded"),
    ("chat/completions", {"model": "lmfusion", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}]}, "not valid base64"),
    ("chat/completions", {"model": "lmfusion", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, "only data: URLs"),
    ("chat/completions", {"model": "lmfusion", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input_audio"),
])
def test_bad_input_is_a_400_naming_the_problem(server, path, body, fragment):
    status, _, reply = http("POST", f"{server.url}/v1/{path}", body)
    _assert_error(status, reply, 400, fragment)


def test_a_scheduler_that_does_not_fit_the_models_objective_is_a_400(server, model):
    from lmfusion.diffusion import SAMPLER_NAMES, SAMPLERS

    wrong = next(name for name in SAMPLER_NAMES if name not in SAMPLERS[model.config.objective])
    status, _, reply = http("POST", f"{server.url}/v1/images/generations", {"prompt": "x", "scheduler": wrong})
    _assert_error(status, reply, 400, "does not fit")


def test_the_openai_client_sees_a_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="x", n=11)
    assert caught.value.status_code == 400 and "n:" in caught.value.message


def test_malformed_json_and_unknown_routes(server):
    status, _, reply = http("POST", f"{server.url}/v1/chat/completions", b"{not json")
    _assert_error(status, reply, 400, "not valid JSON")
    status, _, reply = http("GET", f"{server.url}/v1/nothing-here")
    _assert_error(status, reply, 404, "no such endpoint")


def test_an_oversized_body_is_a_413(start_server):
    small = start_server(max_body_bytes=1000)
    status, _, reply = http("POST", f"{small.url}/v1/chat/completions", {**RED, "pad": "x" * 2000})
    _assert_error(status, reply, 413, "larger than")
    # Chunked upload (no Content-Length): the limit still holds.
    with socket.create_connection(("127.0.0.1", small.port), timeout=10) as conn:
        chunk = b"x" * 1500
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n")
        assert conn.recv(100).startswith(b"HTTP/1.1 413")
    assert http("GET", f"{small.url}/health")[0] == 200


def test_api_key_is_required_when_set(start_server):
    locked = start_server(api_key="sesame")
    url = f"{locked.url}/v1"
    for key in (None, "wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        status, reply_headers, reply = http("GET", f"{url}/models", headers=headers)
        _assert_error(status, reply, 401, "API key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=url, api_key="sesame", max_retries=0)
    assert good.models.list().data[0].id == "lmfusion"
    assert http("GET", f"{locked.url}/health")[0] == 200  # health stays open for probes


@pytest.fixture()
def blocked(start_server, request):
    """A server with one waiting slot whose worker is busy until `release` is set."""
    busy = start_server(max_queue=1, request_timeout=getattr(request, "param", 1.5))
    release = threading.Event()
    busy.worker.submit_call(lambda cancelled: release.wait(120))
    _wait_until(lambda: busy.worker.running == 1)
    yield busy, release
    release.set()


def _wait_until(condition, timeout=60.0):  # generous: the machine may be busy
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_a_full_queue_is_a_503_with_retry_after_and_a_timeout_frees_the_slot(blocked):
    busy, release = blocked
    results = {}
    waiting = threading.Thread(target=lambda: results.update(first=http("POST", f"{busy.url}/v1/chat/completions", RED)))
    waiting.start()
    _wait_until(lambda: busy.worker.waiting == 1)
    status, headers, reply = http("POST", f"{busy.url}/v1/images/generations", {"prompt": "x"})
    _assert_error(status, reply, 503, "queue is full")
    assert headers.get("retry-after") == "1"
    waiting.join(120)  # the waiting request times out (1.5 s) and gives its slot back
    _assert_error(*results["first"][::2], 503, "timed out")
    assert busy.worker.waiting == 0
    release.set()
    _wait_until(lambda: busy.worker.running == 0)
    assert http("POST", f"{busy.url}/v1/chat/completions", {**RED, "max_tokens": 2})[0] == 200


@pytest.mark.parametrize("blocked", [300.0], indirect=True)  # a timeout that cannot be what frees it
def test_a_client_that_disconnects_frees_its_slot(blocked):
    busy, release = blocked
    with pytest.raises(OSError):  # the client gives up after 0.3 s
        http("POST", f"{busy.url}/v1/images/generations", {"prompt": "x"}, timeout=0.3)
    _wait_until(lambda: busy.worker.waiting == 0)
    assert busy.worker.stats.cancelled == 1 and busy.worker.running == 1  # still busy: the slot came back
