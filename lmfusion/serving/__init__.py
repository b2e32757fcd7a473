"""`lmfusion serve`: an OpenAI-compatible HTTP API and a web page over one loaded model.

    from lmfusion.serving import create_app, ServeSettings
    app = create_app(model, ServeSettings(api_key="secret"))     # a FastAPI app; run with uvicorn

Modules: `app` (routes), `schemas` (request bodies), `chat` (what a chat request means here),
`engine` (calls into lmfusion.sampling), `worker` (queue + batching thread), `guards` (body
limit, API key), `errors` (OpenAI's error shape), `server` (uvicorn + signals), `cli`.
Importing this package is cheap; FastAPI loads on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"create_app": "app", "ServeSettings": "app"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
