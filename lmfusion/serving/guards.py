"""What a request must pass before any handler runs: a body size limit and the API key.

The size limit is ASGI middleware that reads the body itself (bounded) before handing it on, so
an oversized upload is refused with 413 whether it declares its length or streams it chunked,
and never reaches the JSON parser.
"""

from __future__ import annotations

import hmac
import json

from fastapi import Request

from .errors import APIError, error_body


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413 in OpenAI's error shape."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away mid-upload
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notices, as usual

        await self.app(scope, replay, send)

    async def _refuse(self, send):
        limit_mib = self.max_bytes / 2**20
        payload = json.dumps(error_body(413, f"request body is larger than the server's limit of {limit_mib:g} MiB")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def require_key(expected: str | None):
    """A FastAPI dependency: with a key configured, `Authorization: Bearer KEY` must carry it."""

    async def check(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise APIError(401, "missing API key: send 'Authorization: Bearer KEY' (the server was started with --api-key)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return check
