"""`lmfusion serve`: load a model once and serve the OpenAI-compatible API and the web page.

Arguments and the port are checked before the model loads, so a typo or a busy port fails in a
second with one line. Needs the `serve` extra (FastAPI, uvicorn), which install.sh installs.
"""

from __future__ import annotations

import ipaddress
import os
import sys

from ..diffusion import DEFAULT_IMAGE_GUIDANCE_SCALE
from ..sampling.cli import SCHEDULERS, add_guidance_scale_argument


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP API and web page",
        description="Serve a model over HTTP: /v1/images/generations, /v1/chat/completions, /v1/models, "
                    "/health, and a web page at /. Ctrl-C or SIGTERM stops it cleanly.",
    )
    p.add_argument("--checkpoint", required=True, help="model folder, or a training run folder (its latest model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("LMFUSION_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $LMFUSION_API_KEY; unset = no key)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--model-name", default="lmfusion", help="the model id clients send and /v1/models lists")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 503 (default 64)")
    p.add_argument("--max-batch-images", type=int, default=16, help="images sampled together in one call (default 16)")
    p.add_argument("--no-batching", action="store_true", help="sample each image request on its own")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take, queue included (default 600)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on Ctrl-C/SIGTERM, seconds to let in-flight requests finish before closing them (default 30)")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body in MiB; larger gets 413 (default 16)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps when a request does not say (default 50)")
    add_guidance_scale_argument(p, help="classifier-free guidance scale when a request does not say; 1 = none")
    p.add_argument("--image-guidance-scale", type=float, default=None,
                   help="edits: guidance toward the source image when a request does not say; 1 = none "
                        f"(default: the model's own, else {DEFAULT_IMAGE_GUIDANCE_SCALE})")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                   help="sampler when a request does not say (default: the one of the model's objective)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"), help="server log level")
    p.set_defaults(func=run_serve)


def settings_from_args(args):
    from .app import ServeSettings
    from ..sampling.image import check_sampling_args

    check_sampling_args(args.steps, args.guidance_scale, 1, args.scheduler)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    for flag, value in (("--max-queue", args.max_queue), ("--max-batch-images", args.max_batch_images)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.request_timeout <= 0 or args.max_body_mb <= 0 or args.shutdown_timeout < 0:
        raise ValueError("--request-timeout and --max-body-mb must be positive, --shutdown-timeout not negative")
    if args.image_guidance_scale is not None and args.image_guidance_scale < 0:
        raise ValueError(f"--image-guidance-scale must be >= 0 (1 = none), got {args.image_guidance_scale}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty")
    return ServeSettings(
        model_name=args.model_name, api_key=args.api_key, max_queue=args.max_queue,
        max_batch_images=args.max_batch_images, batching=not args.no_batching,
        request_timeout=args.request_timeout, max_body_bytes=int(args.max_body_mb * 2**20),
        steps=args.steps, guidance_scale=args.guidance_scale, scheduler=args.scheduler,
        image_guidance_scale=args.image_guidance_scale,
    )


def run_serve(args) -> int:
    try:
        from .app import create_app
        from .server import bind, serve
    except ImportError as error:
        raise ValueError(f"serve needs FastAPI and uvicorn ({error.name} is missing): pip install -e '.[serve]'") from error
    settings = settings_from_args(args)
    sock = bind(args.host, args.port)
    if not _is_loopback(args.host) and settings.api_key is None:
        print(f"lmfusion serve: warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    import torch

    from ..sampling.image import check_sampling_args
    from ..sampling.pipeline import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint, args.device)
    check_sampling_args(args.steps, args.guidance_scale, 1, args.scheduler, getattr(model.config, "objective", None))
    app = create_app(model, settings)
    host, port = sock.getsockname()[:2]
    size = model.config.image_size
    print(f"lmfusion serve: http://{_url_host(host)}:{port}/ (model {settings.model_name!r}, {size}x{size} images); "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    serve(app, sock, args.log_level, args.shutdown_timeout)
    _finish_running_work(app.state.worker)
    print("lmfusion serve: stopped", file=sys.stderr)
    return 0


def _finish_running_work(worker) -> None:
    """Let a batch still running after the shutdown timeout end; a second Ctrl-C abandons it.

    Leaving it to the interpreter's exit would kill a thread that is inside torch, which
    aborts the process instead of exiting cleanly.
    """
    if not worker.alive:
        return
    print("lmfusion serve: finishing the running request (Ctrl-C again to abandon it)", file=sys.stderr, flush=True)
    try:
        worker.join()
    except KeyboardInterrupt:
        print("lmfusion serve: abandoned the running request", file=sys.stderr, flush=True)
        sys.stderr.flush()
        os._exit(130)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
