"""`POST /v1/images/edits`: OpenAI's multipart form (image, prompt, n, size, response_format).

    client.images.edit(image=open("in.png", "rb"), prompt="make it blue", extra_body={"seed": 0})

The form is parsed with the standard library's MIME parser rather than Starlette's
`request.form()`, which needs the python-multipart package: one small parse of a body that
BodyLimit has already capped is not worth a new dependency of the server. Text fields are then
validated by `EditForm` exactly as JSON bodies are (a 400 naming the field); the image is
decoded before the request waits in the queue, so a file that is not an image fails at once.
Extras, as for generations: `seed`, `steps`, `guidance_scale`, `image_guidance_scale`, `scheduler`, and
`strength` (below 1, the edit starts from the noised source: SDEdit).
"""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import HTTP

import torch
from fastapi import Request
from pydantic import ValidationError

from ..data.images import BadImageError, load_rgb_image
from .errors import bad_request
from .schemas import EditForm


def parse_form(content_type: str, body: bytes) -> dict[str, list[tuple[str | None, bytes]]]:
    """multipart/form-data -> {field name: [(file name or None, bytes), ...]} in order."""
    if not content_type.lower().startswith("multipart/form-data") or "boundary=" not in content_type:
        raise bad_request("the body must be multipart/form-data (fields image and prompt), as OpenAI's images.edit "
                          "sends it")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise bad_request("the multipart body could not be parsed")
    fields: dict[str, list[tuple[str | None, bytes]]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields.setdefault(str(name), []).append((part.get_filename(), part.get_payload(decode=True) or b""))
    return fields


def edit_form(fields: dict[str, list[tuple[str | None, bytes]]]) -> EditForm:
    """The text fields as an EditForm; a bad value is a 400 naming its field, as for JSON bodies."""
    values = {}
    for name, parts in fields.items():
        if name in EditForm.model_fields and parts[0][0] is None:
            values[name] = parts[-1][1].decode("utf-8", errors="replace")
    try:
        return EditForm(**values)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        message = f"{param} is required" if first.get("type") == "missing" else f"{param}: {first['msg']}"
        raise bad_request(message, param) from error


def source_image(fields: dict[str, list[tuple[str | None, bytes]]], size: int) -> torch.Tensor:
    """The one uploaded image as [3, size, size] in [0, 1]; 400 when absent, several, or not an image."""
    uploads = fields.get("image", []) + fields.get("image[]", [])
    if not uploads:
        raise bad_request("image is required: upload the image to edit as the form field 'image'", "image")
    if len(uploads) > 1:
        raise bad_request(f"{len(uploads)} images sent; this model edits one image per request", "image")
    data = uploads[0][1]
    if not data:
        raise bad_request("image is empty", "image")
    try:
        return load_rgb_image(data, size)
    except BadImageError as error:
        raise bad_request(f"image could not be read as an image ({error.reason})", "image") from error


async def read_edit_request(request: Request, image_size: int) -> tuple[EditForm, torch.Tensor]:
    fields = parse_form(request.headers.get("content-type", ""), await request.body())
    form = edit_form(fields)
    if "mask" in fields:
        raise bad_request("mask is not supported: this model edits the whole image as the prompt says", "mask")
    return form, source_image(fields, image_size)
