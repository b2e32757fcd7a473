"""Load test for `lmfusion serve`: concurrent image and chat requests, batching on vs off.

    python benchmarks/serve_load.py --threads 1                     # tiny random model, 32 requests
    python benchmarks/serve_load.py --checkpoint runs/quickstart --steps 10 --out serve.md

Starts the server in-process on 127.0.0.1 (a free port) over one model and sends --requests
requests at once, one client thread each, with the real `openai` client (no retries). Three in
four ask for images (each its own prompt and seed, some n = 2), the rest for text. Bounded: a
fixed number of requests, each with a timeout, and the script stops by itself.

Checks, for each configuration: every request is answered or cleanly rejected (an OpenAI-shaped
503); every answer equals what the model gives for that request alone (images within 1/255 per
channel, text exactly), so nothing was lost or crossed between requests in a batch; /health
still answers ok afterwards. Reports p50/p95 latency and requests per second, and the CPU
seconds the whole process (server and client threads) used: on a machine shared with other
jobs, wall times include waiting for a core, CPU seconds do not.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lmfusion.diffusion import DEFAULT_GUIDANCE_SCALE

IMAGE_PROMPTS = [
    "a small red circle", "a large blue square", "a green triangle above a yellow circle",
    "a purple square below an orange triangle", "a small yellow circle to the left of a red square",
    "a large green circle", "an orange square", "a blue triangle",
]
TEXT_PROMPTS = ["the quick brown fox", "Hello world!", "a photo of a sneaker", "the lazy dog"]


# ---------------------------------------------------------------------- requests
def make_requests(count: int, steps: int, max_tokens: int = 8) -> list[dict]:
    """`count` request specs: every 4th is a text chat, the others images (every 3rd image n = 2)."""
    specs = []
    for i in range(count):
        if i % 4 == 3:
            specs.append({"kind": "chat", "prompt": TEXT_PROMPTS[i % len(TEXT_PROMPTS)], "max_tokens": max_tokens})
        else:
            specs.append({"kind": "image", "prompt": IMAGE_PROMPTS[i % len(IMAGE_PROMPTS)], "seed": 1000 + 17 * i,
                          "n": 2 if i % 3 == 0 else 1, "steps": steps})
    return specs


def send(client, spec: dict) -> dict:
    """One request; its latency and what came back (answer, clean rejection, or error)."""
    import openai

    start = time.perf_counter()
    try:
        if spec["kind"] == "image":
            reply = client.images.generate(prompt=spec["prompt"], n=spec["n"],
                                           extra_body={"seed": spec["seed"], "steps": spec["steps"]})
            answer = [item.b64_json for item in reply.data]
        else:
            reply = client.chat.completions.create(model="lmfusion", max_tokens=spec["max_tokens"],
                                                   messages=[{"role": "user", "content": spec["prompt"]}])
            answer = reply.choices[0].message.content
        return {"outcome": "answered", "seconds": time.perf_counter() - start, "answer": answer}
    except openai.APIStatusError as error:
        clean = error.status_code in (429, 503) and isinstance(error.body, dict) and "message" in error.body
        return {"outcome": "rejected" if clean else "error", "seconds": time.perf_counter() - start,
                "status": error.status_code, "detail": str(error)}
    except Exception as error:  # a dropped connection, a timeout: the load test reports it
        return {"outcome": "error", "seconds": time.perf_counter() - start, "detail": repr(error)}


def fire(url: str, specs: list[dict], timeout: float = 300.0) -> tuple[list[dict], float]:
    """All requests at once, one thread each; results in request order, and the wall seconds."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="load-test", max_retries=0, timeout=timeout)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(specs)) as pool:
        results = list(pool.map(lambda spec: send(client, spec), specs))
    return results, time.perf_counter() - start


# ---------------------------------------------------------------------- checking
def reference(pipe, spec: dict, guidance_scale: float = DEFAULT_GUIDANCE_SCALE):
    """What the model (in an LMFusionPipeline) gives for this request alone: pixel arrays, or the text."""
    if spec["kind"] == "image":
        images = pipe.generate_image(spec["prompt"], spec["steps"], guidance_scale, spec["seed"], n=spec["n"], progress=False)
        return [np.asarray(image, dtype=np.int16) for image in images]
    return pipe.generate_text(spec["prompt"], spec["max_tokens"])


def problems(specs: list[dict], results: list[dict], references: list) -> list[str]:
    """Every way the results fall short: errors, and answers that are not their request's own."""
    found = []
    for index, (spec, result, expected) in enumerate(zip(specs, results, references)):
        if result["outcome"] == "error":
            found.append(f"request {index}: {result['detail']}")
        elif result["outcome"] == "answered" and spec["kind"] == "image":
            served = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB"), dtype=np.int16)
                      for b in result["answer"]]
            if len(served) != len(expected) or any(np.abs(s - e).max() > 1 for s, e in zip(served, expected)):
                found.append(f"request {index}: images differ from {spec['prompt']!r} with seed {spec['seed']} alone")
        elif result["outcome"] == "answered" and result["answer"] != expected:
            found.append(f"request {index}: text {result['answer']!r} != {expected!r}")
    return found


def load_test(url: str, pipe, specs: list[dict], references: list | None = None) -> dict:
    """Fire `specs` at the server at `url` and check everything against `pipe`; a summary with the problems."""
    from urllib.request import urlopen

    references = references if references is not None else [reference(pipe, spec) for spec in specs]
    load_before, cpu_before = os.getloadavg()[0], time.process_time()
    results, wall = fire(url, specs)
    load_after, cpu = os.getloadavg()[0], time.process_time() - cpu_before
    with urlopen(f"{url}/health", timeout=10) as response:
        healthy = response.status == 200
    answered = sorted(r["seconds"] for r in results if r["outcome"] == "answered")
    return {
        "answered": len(answered), "rejected": sum(r["outcome"] == "rejected" for r in results),
        "errors": sum(r["outcome"] == "error" for r in results),
        "p50": float(np.percentile(answered, 50)) if answered else float("nan"),
        "p95": float(np.percentile(answered, 95)) if answered else float("nan"),
        "requests_per_second": len(answered) / wall, "wall": wall, "cpu": cpu, "healthy": healthy,
        "problems": problems(specs, results, references), "load": (load_before, load_after),
    }


# ---------------------------------------------------------------------- the benchmark
def build_tiny_model(directory: Path):
    """A tiny random LMFusion model (as in the tests): 16 px pixel images, 4 image tokens."""
    from lmfusion.testing import save_peaky_base, tiny_sampling_model

    return tiny_sampling_model(save_peaky_base(directory))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="model or run folder (default: a tiny random model)")
    parser.add_argument("--requests", type=int, default=32, help="concurrent requests per configuration (default 32)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image (default 20)")
    parser.add_argument("--max-queue", type=int, default=64, help="the server's queue size (default 64)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration, alternating (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default=None, help="also write the Markdown report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lmfusion.sampling.pipeline import LMFusionPipeline, load_model
    from lmfusion.serving.app import ServeSettings, create_app
    from lmfusion.serving.server import ServerThread

    if args.checkpoint:
        model, model_name = load_model(args.checkpoint, "cpu"), args.checkpoint
    else:
        model, model_name = build_tiny_model(Path(tempfile.mkdtemp(prefix="serve_load_"))), "tiny random model (tests' config)"
    specs = make_requests(args.requests, args.steps)
    print(f"references: {len(specs)} requests, each alone ...", file=sys.stderr)
    pipe = LMFusionPipeline(model)
    references = [reference(pipe, spec) for spec in specs]
    rows, failed = [], False
    for repeat in range(args.repeats):
        for batching in (True, False):
            app = create_app(model, ServeSettings(batching=batching, max_queue=args.max_queue, steps=args.steps))
            with ServerThread(app) as server:
                summary = load_test(server.url, pipe, specs, references)
                stats = server.worker.stats
            summary.update(batching=batching, repeat=repeat + 1, batches=stats.batches, largest=stats.largest_batch)
            rows.append(summary)
            failed |= bool(summary["problems"]) or summary["errors"] > 0 or not summary["healthy"]
            print(f"batching {'on ' if batching else 'off'} run {repeat + 1}: {summary['answered']} answered, "
                  f"{summary['rejected']} rejected, p50 {summary['p50']:.2f} s, {summary['requests_per_second']:.2f} req/s",
                  file=sys.stderr)
            for problem in summary["problems"]:
                print("  PROBLEM:", problem, file=sys.stderr)
    report = render(rows, args, model_name, model)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 1 if failed else 0


def render(rows: list[dict], args, model_name: str, model) -> str:
    images = sum(1 for s in make_requests(args.requests, args.steps) if s["kind"] == "image")
    lines = [
        f"Model: {model_name}, {model.config.image_size} px images, {model.config.tokens_per_image} image tokens; "
        f"{args.requests} concurrent requests ({images} image requests, {args.requests - images} text chats), "
        f"{args.steps} denoising steps (the model's own sampler), guidance scale {DEFAULT_GUIDANCE_SCALE}, queue {args.max_queue}; torch {torch.__version__}, "
        f"{args.threads} torch thread(s), {os.cpu_count()} CPUs ({platform.machine()}).",
        "",
        "| batching | run | answered | rejected | errors | p50 s | p95 s | req/s | CPU s (process) | sampler calls for images | largest batch | lost/crossed | healthy after | load avg before → after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {'on' if r['batching'] else 'off'} | {r['repeat']} | {r['answered']} | {r['rejected']} | {r['errors']} | "
            f"{r['p50']:.2f} | {r['p95']:.2f} | {r['requests_per_second']:.2f} | {r['cpu']:.1f} | {r['batches']} | {r['largest']} | "
            f"{len(r['problems'])} | {'yes' if r['healthy'] else 'NO'} | {r['load'][0]:.1f} → {r['load'][1]:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
