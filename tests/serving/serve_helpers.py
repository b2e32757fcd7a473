"""Helpers for the serve tests: the tiny model they share, and raw HTTP requests."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import torch

from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.testing import tiny_lmfusion_config, tiny_text_model, tiny_tokenizer

STEPS = 3  # denoising steps for every test request: enough to exercise the sampler, cheap


def build_tiny_model(directory: Path) -> tuple[LMFusionModel, Path]:
    """The model, and the folder it is saved in (`lmfusion serve --checkpoint` loads it)."""
    base = directory / "base"
    tokenizer = tiny_tokenizer()
    tiny_text_model(len(tokenizer), seed=0, initializer_range=0.2).save_pretrained(base)
    tokenizer.save_pretrained(base)
    torch.manual_seed(1)
    model = LMFusionModel.from_text_model(str(base), tiny_lmfusion_config(str(base))).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.image_out.conv_out.weight, std=0.1)
        torch.nn.init.normal_(model.image_out.conv_out.bias, std=0.1)
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
