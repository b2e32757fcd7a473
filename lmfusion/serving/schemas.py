"""Request bodies, as OpenAI's clients send them, plus lmfusion's few extra fields.

Unknown fields are ignored (clients send many options this model has no use for); fields that
are known but out of range are a 400 naming the field. Extras beyond OpenAI's API, sent with
the openai client's `extra_body=`: `steps`, `guidance_scale`, `scheduler` (and `seed` for
images), and `max_images` for chat replies that may draw.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..diffusion import SAMPLER_NAMES as SCHEDULERS  # which of them fit depends on the model's objective

MAX_IMAGES_PER_REQUEST = 10  # OpenAI's own limit for n
MAX_PROMPT_CHARS = 32_000  # a cheap first cut; the token limit of the model is checked after
MAX_NEW_TOKENS = 4096
MAX_STEPS = 1000
MAX_SEED = 2**31 - 1 - MAX_IMAGES_PER_REQUEST  # image k of a request uses seed + k


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class DiffusionOptions(_Request):
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="denoising steps")
    guidance_scale: float | None = Field(None, ge=0, le=50, description="classifier-free guidance; 1 = none")
    scheduler: Literal[SCHEDULERS] | None = None


class ImageRequest(DiffusionOptions):
    """The body of `POST /v1/images/generations` (OpenAI's fields; `size` must match the model's)."""

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    stream: bool | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)


class EditForm(ImageRequest):
    """The text fields of `POST /v1/images/edits` (a multipart form; the image is a file field):
    the generation request's fields plus the guidance toward the source image."""

    image_guidance_scale: float | None = Field(None, ge=0, le=50, description="guidance toward the source; 1 = none")
    strength: float = Field(1.0, gt=0, le=1, description="below 1: start from the noised source (SDEdit); 1 = from noise")


class TextPart(_Request):
    type: Literal["text"]
    text: str = Field(max_length=MAX_PROMPT_CHARS)


class ImageURL(_Request):
    url: str


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | list[Part] | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class ChatRequest(DiffusionOptions):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int | None = Field(None, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    modalities: list[Literal["text", "image"]] | None = None
    tools: list | None = None
    max_images: int | None = Field(None, ge=0, le=8, description="images a reply may draw (modalities with 'image')")
