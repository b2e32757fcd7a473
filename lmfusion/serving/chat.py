"""Chat messages in, chat completions out: what `/v1/chat/completions` means for this model.

A request is answered in one of three ways, chosen by what it holds:

- **answer** (VLM base, e.g. the llavafusion preset): the last user message carries images
  (`image_url` parts, as data URLs). The VLM reads the images and the message's text through
  its own understanding path and answers it (an image with no text is asked for a caption).
- **edit** (text-LM base): the same kind of message, with one image and text that asks to change
  it ("make it blue", `is_edit_instruction`). The text is the edit instruction: the reply holds the
  edited image in `message.images` (as interleaved replies do) and `[image 1]` as its content,
  computed as `POST /v1/images/edits` computes it (the request's `seed`, `steps`, `guidance_scale`,
  and the server's image guidance).
- **caption** (text-LM base): the same kind of message otherwise. The reply is the model's
  caption of each image (one per line); the message's text is not read: a text LM base was
  trained to caption images and to edit them, not to answer questions about them.
- **interleaved**: `modalities` includes "image". The model continues the conversation and may
  draw (it emits BOI). Drawn images are returned in `message.images` as
  `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}` (the shape image
  inputs have, and the one OpenRouter uses for image output), and `message.content` holds the
  text with a `[image k]` marker where the k-th image was drawn.
- **text**: anything else. The base model's own text behaviour: the reply equals
  `generate_text(model, prompt)` for the rendered prompt (see `Engine.render_chat`).

Images in earlier messages are not part of the context in any mode (a stateless API would
have to re-encode them on every turn); only their text is kept.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
import uuid
from dataclasses import dataclass, field

import torch

from .errors import bad_request
from .schemas import Message

IMAGE_MARKER = "[image {}]"
# Verbs (and "should be/become") of the edit phrasings the editing data teaches (data/shapes_edits.py),
# and their common synonyms. A question ("what colour is it?") asks about the image, not to change it.
_EDIT_WORDS = re.compile(r"\b(make|change|turn|paint|recolou?r|resize|scale|move|shift|nudge|reshape|add|put|place|"
                         r"insert|remove|delete|erase|take away|get rid of|replace|should (be|become))\b", re.I)
_QUESTION_START = re.compile(r"^\s*(what|which|who|whom|whose|where|when|why|how|is|are|does|do|describe|caption)\b",
                             re.I)


def is_edit_instruction(text: str) -> bool:
    """Whether a message's text asks to change its image: an edit verb, and not a question about it."""
    return bool(text.strip()) and bool(_EDIT_WORDS.search(text)) and not _QUESTION_START.match(text)


@dataclass
class ChatInput:
    messages: list[dict]  # {"role", "content"} with text only, for the chat template
    images: list[torch.Tensor] = field(default_factory=list)  # the last user message's images
    image_bytes: list[bytes] = field(default_factory=list)  # the same images as sent (a VLM's processor reads them)

    @property
    def question(self) -> str:
        """The last user message's text (what a VLM base is asked about its images)."""
        last_user = max(i for i, m in enumerate(self.messages) if m["role"] == "user")
        return self.messages[last_user]["content"]


def parse_messages(messages: list[Message], image_size: int) -> ChatInput:
    """Text of every message, and the decoded images of the last user message (400 if bad)."""
    from ..data.images import load_rgb_image

    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last_user is None:
        raise bad_request("messages must include a user message", "messages")
    texts, images, raw = [], [], []
    for index, message in enumerate(messages):
        parts = [message.content] if isinstance(message.content, str) else (message.content or [])
        text = []
        for number, part in enumerate(parts):
            if isinstance(part, str):
                text.append(part)
            elif part.type == "text":
                text.append(part.text)
            elif index == last_user:
                where = f"messages.{index}.content.{number}.image_url"
                try:
                    raw.append(decode_data_url(part.image_url.url, where))
                    images.append(load_rgb_image(raw[-1], image_size))
                except ValueError as error:
                    raise bad_request(f"{where}: the image could not be decoded ({error})", where) from error
        texts.append({"role": message.role, "content": "\n".join(text)})
    if not images and not texts[last_user]["content"].strip():
        raise bad_request("the last user message is empty", f"messages.{last_user}.content")
    return ChatInput(texts, images, raw)


def decode_data_url(url: str, where: str) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL; this server fetches nothing remote."""
    if not url.startswith("data:"):
        raise bad_request(f"{where}: only data: URLs are accepted (data:image/png;base64,...); this server fetches nothing", where)
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise bad_request(f"{where}: expected a base64 data URL (data:image/png;base64,...)", where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise bad_request(f"{where}: the data URL is not valid base64", where) from error


# ---------------------------------------------------------------------- replies
def image_data_url(image, image_format: str = "png") -> str:
    return f"data:image/{image_format};base64,{encode_image(image, image_format)}"


def encode_image(image, image_format: str = "png") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format.upper())
    return base64.b64encode(buffer.getvalue()).decode()


def interleaved_message(parts: list) -> dict:
    """Text and PIL images (reading order) as an assistant message: text with markers + images."""
    content, images = [], []
    for part in parts:
        if isinstance(part, str):
            content.append(part)
        else:
            images.append({"type": "image_url", "image_url": {"url": image_data_url(part)}})
            content.append(IMAGE_MARKER.format(len(images)))
    message = {"role": "assistant", "content": "".join(content)}
    if images:
        message["images"] = images
    return message


def completion(model: str, message: dict, finish_reason: str, usage: dict | None) -> dict:
    return {
        "id": new_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage,
    }


def chunk(completion_id: str, model: str, delta: dict, finish_reason: str | None = None, usage: dict | None = None) -> dict:
    body = {
        "id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"
