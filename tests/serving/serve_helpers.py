"""Helpers for the serve tests: the tiny model they share, and raw HTTP requests."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path


from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.testing import save_peaky_base, tiny_sampling_model

STEPS = 3  # denoising steps for every test request: enough to exercise the sampler, cheap


def build_tiny_model(directory: Path) -> tuple[LMFusionModel, Path]:
    """The model, and the folder it is saved in (`lmfusion serve --checkpoint` loads it)."""
    model = tiny_sampling_model(save_peaky_base(directory / "base"))
    model.save_pretrained(directory / "model")
    return model, directory / "model"


def http(method: str, url: str, body=None, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict, object]:
    """(status, headers, parsed JSON or text) for one raw request; 4xx/5xx are returned, not raised."""
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, reply_headers, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        status, reply_headers, raw = error.code, dict(error.headers), error.read()
    try:
        return status, reply_headers, json.loads(raw)
    except ValueError:
        return status, reply_headers, raw.decode(errors="replace")
