"""The FastAPI app: OpenAI-compatible routes, the web page, health, and the worker's lifetime.

    app = create_app(model, ServeSettings(api_key="secret"))   # then run it with uvicorn

Handlers validate and tokenize (cheap, so bad input is refused before it waits), hand the
model work to the `ModelWorker`, and wait for it without blocking the event loop, polling for
a client that went away or a request that ran past its timeout; either frees its queue slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from . import chat
from .edits import read_edit_request
from .engine import Engine
from .errors import APIError, bad_request, error_body, install_handlers
from .guards import BodyLimit, require_key
from .schemas import MAX_SEED, ChatRequest, ImageRequest
from .worker import ImageWork, Job, ModelWorker, QueueFull, ShuttingDown

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("lmfusion.serving")
POLL_SECONDS = 0.1  # how often a waiting handler checks for a client that went away


@dataclass
class ServeSettings:
    model_name: str = "lmfusion"
    api_key: str | None = None
    max_queue: int = 64  # waiting requests; more get 503 + Retry-After
    max_batch_images: int = 16  # images in one sampler call
    batching: bool = True
    request_timeout: float = 600.0  # seconds from arrival to answer, queue included
    max_body_bytes: int = 16 * 2**20
    steps: int = 50  # defaults for requests that do not say
    guidance_scale: float | None = None  # None: the model's own default (model.config.default_guidance_scale)
    image_guidance_scale: float | None = None  # edits' guidance toward the source; None: the model's own
    scheduler: str | None = None  # None: the sampler of the model's objective
    caption_tokens: int = 32
    chat_tokens: int = 256
    max_images: int = 4


def create_app(model, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    # Model defaults resolved once, so every request and batch key sees a number.
    if settings.guidance_scale is None:
        settings = replace(settings, guidance_scale=model.config.default_guidance_scale)
    if settings.image_guidance_scale is None:
        settings = replace(settings, image_guidance_scale=model.config.default_image_guidance_scale)
    engine = Engine(model, settings.model_name)
    worker = ModelWorker(engine.run_images, settings.max_queue, settings.max_batch_images, settings.batching)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        await asyncio.to_thread(worker.stop, 30.0)

    app = FastAPI(title="lmfusion", summary="OpenAI-compatible image generation, captioning and chat", lifespan=lifespan)
    app.state.engine, app.state.worker, app.state.settings = engine, worker, settings
    install_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    routes = Routes(engine, worker, settings)
    auth = [Depends(require_key(settings.api_key))]
    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/v1/models", routes.models, methods=["GET"], dependencies=auth)
    app.add_api_route("/v1/models/{model_id}", routes.model, methods=["GET"], dependencies=auth)
    app.add_api_route("/v1/images/generations", routes.images, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/images/edits", routes.edits, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/chat/completions", routes.chat, methods=["POST"], dependencies=auth)
    app.add_api_route("/", routes.page, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class Routes:
    def __init__(self, engine: Engine, worker: ModelWorker, settings: ServeSettings):
        self.engine, self.worker, self.settings = engine, worker, settings

    # ------------------------------------------------------------------ small routes
    async def page(self):
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def health(self):
        ok = self.worker.alive and not self.worker.stopping
        stats = self.worker.stats
        body = {
            "status": "ok" if ok else "unavailable", "model": self.settings.model_name,
            "image_size": self.engine.image_size, "batching": self.settings.batching,
            "queue": {"waiting": self.worker.waiting, "running": self.worker.running, "max_waiting": self.settings.max_queue},
            "served": {"jobs": stats.jobs_done, "image_batches": stats.batches, "images": stats.images,
                       "largest_batch": stats.largest_batch, "rejected": stats.rejected, "cancelled": stats.cancelled},
        }
        return JSONResponse(body, 200 if ok else 503)

    def _model_card(self) -> dict:
        return {"id": self.settings.model_name, "object": "model", "created": 0, "owned_by": "lmfusion"}

    async def models(self):
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model_id: str):
        self._check_model(model_id)
        return self._model_card()

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            raise APIError(400, f"unknown model {name!r}; this server serves {self.settings.model_name!r}", "model",
                           "model_not_found")

    # ------------------------------------------------------------------ images
    async def images(self, body: ImageRequest, request: Request):
        self._check_image_options(body)
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED)
        work = ImageWork(
            body.prompt, body.n, seed,
            body.steps or self.settings.steps,
            body.guidance_scale if body.guidance_scale is not None else self.settings.guidance_scale,
            self._scheduler(body.scheduler),
        )
        images = await self._wait(self._submit(lambda: self.worker.submit_images(work)), request)
        return await self._image_response(images, seed, body.output_format)

    async def edits(self, request: Request):
        """OpenAI's image edit: one uploaded image and an instruction, n edits back (see edits.py).
        Waiting edits with the same settings share a sampler call, as generations do."""
        body, source = await read_edit_request(request, self.engine.image_size)
        self._check_image_options(body)
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED)
        steps = body.steps or self.settings.steps
        guidance = body.guidance_scale if body.guidance_scale is not None else self.settings.guidance_scale
        image_guidance = (body.image_guidance_scale if body.image_guidance_scale is not None
                          else self.settings.image_guidance_scale)
        work = ImageWork(body.prompt, body.n, seed, steps, guidance, self._scheduler(body.scheduler), source,
                         image_guidance, body.strength)
        images = await self._wait(self._submit(lambda: self.worker.submit_images(work)), request)
        return await self._image_response(images, seed, body.output_format)

    def _check_image_options(self, body) -> None:
        """What generations and edits refuse alike, before any work: 400 naming the field."""
        self._check_model(body.model)
        size = self.engine.image_size
        if body.size not in (None, "auto", f"{size}x{size}"):
            raise bad_request(f"size {body.size!r} is not available: this model draws {size}x{size} images", "size")
        if body.response_format == "url":
            raise bad_request("response_format 'url' is not supported; use 'b64_json' (the default)", "response_format")
        if body.stream:
            raise bad_request("stream is not supported for images", "stream")
        if not body.prompt.strip():
            raise bad_request("prompt is empty", "prompt")
        self._check(self.engine.check_image_prompt, body.prompt, param="prompt")

    async def _image_response(self, images: list, seed: int, output_format: str | None) -> dict:
        size, image_format = self.engine.image_size, output_format or "png"
        encoded = await run_in_threadpool(lambda: [chat.encode_image(image, image_format) for image in images])
        return {
            "created": int(time.time()), "output_format": image_format, "size": f"{size}x{size}",
            "data": [{"b64_json": data, "revised_prompt": None, "seed": seed + k} for k, data in enumerate(encoded)],
        }

    # ------------------------------------------------------------------ chat
    async def chat(self, body: ChatRequest, request: Request):
        self._check_model(body.model)
        if body.tools:
            raise bad_request("tools are not supported by this model", "tools")
        parsed = await run_in_threadpool(chat.parse_messages, body.messages, self.engine.image_size)
        temperature = body.temperature if body.temperature is not None else 0.0  # greedy unless asked
        top_p = body.top_p if body.top_p is not None else 1.0
        limit = body.max_completion_tokens or body.max_tokens
        if parsed.images and self.engine.model.is_vlm:
            return await self._answer(body, request, parsed, limit or self.settings.chat_tokens, temperature, top_p)
        if parsed.images and chat.is_edit_instruction(parsed.question):
            return await self._edit_in_chat(body, request, parsed)
        if parsed.images:
            return await self._caption(body, request, parsed, limit or self.settings.caption_tokens, temperature, top_p)
        prompt = self._check(self.engine.render_chat, parsed.messages, param="messages")
        prompt_ids = self._check(self.engine.prompt_ids, prompt, param="messages")
        if "image" in (body.modalities or []):
            return await self._interleaved(body, request, prompt, len(prompt_ids), limit or self.settings.chat_tokens,
                                           temperature, top_p)
        limit = limit or self.settings.chat_tokens
        if body.stream:
            return self._stream_text(body, prompt_ids, limit, temperature, top_p)
        job = self._submit(lambda: self.worker.submit_call(
            lambda cancelled: self.engine.text(prompt_ids, limit, temperature, top_p, body.seed, cancelled)))
        result = await self._wait(job, request)
        message = {"role": "assistant", "content": result.text}
        return self._reply(body, message, result.finish_reason, chat.usage(result.prompt_tokens, result.completion_tokens))

    async def _caption(self, body, request, parsed, limit, temperature, top_p):
        images = parsed.images
        job = self._submit(lambda: self.worker.submit_call(
            lambda cancelled: self.engine.caption(images, limit, temperature, top_p, body.seed)))
        captions = await self._wait(job, request)
        text = "\n".join(captions)
        tokens_in = len(images) * (self.engine.model.config.tokens_per_image + 2)
        usage = chat.usage(tokens_in, len(self.engine.tokenizer(text, add_special_tokens=False).input_ids))
        return self._reply(body, {"role": "assistant", "content": text}, "stop", usage)

    async def _edit_in_chat(self, body, request, parsed):
        """An image and an instruction to change it (text-LM base): one edit, as /v1/images/edits makes it."""
        if len(parsed.images) > 1:
            raise bad_request(f"{len(parsed.images)} images sent with an edit instruction; this model edits one image "
                              "per request", "messages")
        instruction = parsed.question.strip()
        self._check(self.engine.check_image_prompt, instruction, param="messages")
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED)
        guidance = body.guidance_scale if body.guidance_scale is not None else self.settings.guidance_scale
        work = ImageWork(instruction, 1, seed, body.steps or self.settings.steps, guidance,
                         self._scheduler(body.scheduler), parsed.images[0], self.settings.image_guidance_scale)
        images = await self._wait(self._submit(lambda: self.worker.submit_images(work)), request)
        message = await run_in_threadpool(chat.interleaved_message, images)
        return self._reply(body, message, "stop", None)

    async def _answer(self, body, request, parsed, limit, temperature, top_p):
        images, question = parsed.image_bytes, parsed.question
        job = self._submit(lambda: self.worker.submit_call(
            lambda cancelled: self.engine.answer(images, question, limit, temperature, top_p, body.seed)))
        result = await self._wait(job, request)
        return self._reply(body, {"role": "assistant", "content": result.text}, result.finish_reason,
                           chat.usage(result.prompt_tokens, result.completion_tokens))

    async def _interleaved(self, body, request, prompt, prompt_tokens, limit, temperature, top_p):
        steps = body.steps or self.settings.steps
        guidance = body.guidance_scale if body.guidance_scale is not None else self.settings.guidance_scale
        scheduler = self._scheduler(body.scheduler)
        max_images = body.max_images if body.max_images is not None else self.settings.max_images
        job = self._submit(lambda: self.worker.submit_call(lambda cancelled: self.engine.interleaved(
            prompt, limit, max_images, temperature, top_p, body.seed, steps, guidance, scheduler)))
        parts = await self._wait(job, request)
        message = await run_in_threadpool(chat.interleaved_message, parts)
        return self._reply(body, message, "stop", None)

    def _reply(self, body: ChatRequest, message: dict, finish_reason: str, usage: dict | None):
        """A whole reply, or (stream: true) the same reply as one content chunk."""
        name = self.settings.model_name
        if not body.stream:
            return chat.completion(name, message, finish_reason, usage)
        completion_id = chat.new_id()
        events = [chat.chunk(completion_id, name, dict(message)), chat.chunk(completion_id, name, {}, finish_reason)]
        if body.stream_options and body.stream_options.include_usage:
            events.append({**chat.chunk(completion_id, name, {}), "choices": [], "usage": usage})

        async def stream():
            for event in events:
                yield _sse(event)
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    def _stream_text(self, body: ChatRequest, prompt_ids: list[int], limit: int, temperature: float, top_p: float):
        """Server-sent events, one per decoded piece, as the worker produces them."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()

        def on_piece(piece: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        job = self._submit(lambda: self.worker.submit_call(
            lambda cancelled: self.engine.text(prompt_ids, limit, temperature, top_p, body.seed, cancelled, on_piece)))
        job.future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
        name, completion_id = self.settings.model_name, chat.new_id()
        deadline = time.monotonic() + self.settings.request_timeout
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            try:
                yield _sse(chat.chunk(completion_id, name, {"role": "assistant", "content": ""}))
                while True:
                    piece = await asyncio.wait_for(pieces.get(), max(deadline - time.monotonic(), 0.001))
                    if piece is None:
                        break
                    yield _sse(chat.chunk(completion_id, name, {"content": piece}))
                result = job.future.result()
                yield _sse(chat.chunk(completion_id, name, {}, result.finish_reason))
                if include_usage:
                    usage = chat.usage(result.prompt_tokens, result.completion_tokens)
                    yield _sse({**chat.chunk(completion_id, name, {}), "choices": [], "usage": usage})
            except (TimeoutError, asyncio.TimeoutError):
                yield _sse(error_body(503, f"request timed out after {self.settings.request_timeout:g} s"))
            except Exception as error:  # the status line is sent already: report in the stream
                status, message = _status_of(error)
                if status == 500:
                    log.error("streamed chat failed", exc_info=error)
                yield _sse(error_body(status, message))
            finally:
                self.worker.cancel(job)  # no-op when finished; stops decoding if the client left
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # ------------------------------------------------------------------ plumbing
    def _scheduler(self, requested: str | None) -> str | None:
        """The request's scheduler (else the server's default), if it fits the model: else 400."""
        scheduler = requested or self.settings.scheduler
        self._check(self.engine.check_scheduler, scheduler, param="scheduler")
        return scheduler

    @staticmethod
    def _check(function, value, param: str):
        try:
            return function(value)
        except ValueError as error:
            raise bad_request(str(error), param) from error

    def _submit(self, submit) -> Job:
        try:
            return submit()
        except QueueFull as error:
            raise APIError(503, f"server busy: {error}; retry shortly", code="queue_full", headers={"Retry-After": "1"}) from error
        except ShuttingDown as error:
            raise APIError(503, str(error), code="shutting_down") from error

    async def _wait(self, job: Job, request: Request):
        """The job's result; frees the slot if the client leaves or the request times out."""
        future = asyncio.wrap_future(job.future)
        deadline = time.monotonic() + self.settings.request_timeout
        while True:
            done, _ = await asyncio.wait({future}, timeout=POLL_SECONDS)
            if done:
                break
            if await request.is_disconnected():
                self.worker.cancel(job)
                raise APIError(408, "the client closed the connection")
            if time.monotonic() > deadline:
                self.worker.cancel(job)
                raise APIError(503, f"request timed out after {self.settings.request_timeout:g} s", code="timeout")
        try:
            return future.result()
        except (ValueError, ShuttingDown, asyncio.CancelledError) as error:
            status, message = _status_of(error)
            raise APIError(status, message) from error


def _status_of(error: BaseException) -> tuple[int, str]:
    if isinstance(error, ValueError):  # the sampler's word on the input
        return 400, str(error)
    if isinstance(error, (ShuttingDown, asyncio.CancelledError)):
        return 503, "the server is shutting down" if isinstance(error, asyncio.CancelledError) else str(error)
    return 500, "internal server error (the server's log has the details)"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
