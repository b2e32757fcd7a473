"""Errors in OpenAI's JSON shape, and the handlers that make every failure one of them.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "n", "code": null}}

Anything a client sent that is wrong becomes a 4xx with a message naming the problem; only a
bug in the server gives a 500, and then with a generic message (the traceback goes to the
server's log, never to the client).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         503: "server_error"}


class APIError(Exception):
    """An error a client should see: HTTP status, message, and the offending parameter if any."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.param, error.code), error.status, error.headers)


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)


async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return error_response(error)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """Pydantic's complaint as one line: 'n: Input should be less than or equal to 10'.

    For a field that may take several shapes (a message's content is a string or a list of
    parts) pydantic reports every shape's failure; the deepest one is the one that says what
    was wrong with what the client actually sent.
    """
    errors = error.errors() or [{"loc": (), "msg": "invalid request", "type": ""}]
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    # Drop 'body' and pydantic's names for union branches ('constrained-str', 'list[...]').
    location = [str(part) for part in first.get("loc", ()) if part != "body" and (isinstance(part, int) or part.isidentifier())]
    param = ".".join(location) or None
    if first.get("type") == "json_invalid":
        message, param = "the request body is not valid JSON", None
    elif first.get("type") == "missing":
        message = f"{param} is required"
    else:
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
    return error_response(APIError(400, message, param))


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    message = error.detail if isinstance(error.detail, str) else "request failed"
    if error.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
    return error_response(APIError(error.status_code, message, headers=getattr(error, "headers", None)))


async def _server_error(request: Request, error: Exception) -> JSONResponse:
    # Starlette re-raises after this response is sent, so uvicorn logs the traceback server-side.
    return error_response(APIError(500, "internal server error (the server's log has the details)"))
