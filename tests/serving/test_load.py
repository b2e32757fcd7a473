"""benchmarks/serve_load.py against live servers: 32 concurrent requests, none lost or crossed."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from serve_helpers import STEPS

pytest.importorskip("openai")
BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"


@pytest.fixture(scope="module")
def bench():
    from lmfusion.testing import load_script

    return load_script(BENCHMARK)


@pytest.fixture(scope="module")
def pipe(model):
    from lmfusion.sampling import LMFusionPipeline

    return LMFusionPipeline(model)


@pytest.fixture(scope="module")
def load(bench, pipe):
    specs = bench.make_requests(32, STEPS)
    return specs, [bench.reference(pipe, spec) for spec in specs]


def test_32_concurrent_requests_are_answered_each_with_its_own_result(bench, server, pipe, load):
    specs, references = load
    batches_before = server.worker.stats.batches
    summary = bench.load_test(server.url, pipe, specs, references)
    assert summary["problems"] == [] and summary["errors"] == 0
    assert summary["answered"] == 32 and summary["healthy"]
    images = sum(spec["kind"] == "image" for spec in specs)
    assert server.worker.stats.batches - batches_before < images  # some requests really were batched


def test_a_small_queue_rejects_cleanly_and_answers_the_rest_correctly(bench, start_server, pipe, load):
    specs, references = load
    small = start_server(max_queue=4, batching=False)
    release = threading.Event()
    small.worker.submit_call(lambda cancelled: release.wait(120))  # busy until the queue overflows
    threading.Thread(target=lambda: (_wait_until(lambda: small.worker.stats.rejected > 0), release.set())).start()
    summary = bench.load_test(small.url, pipe, specs, references)
    assert summary["problems"] == [] and summary["errors"] == 0
    assert summary["rejected"] > 0 and summary["answered"] >= 4
    assert summary["answered"] + summary["rejected"] == 32 and summary["healthy"]


def test_batches_form_only_from_compatible_requests(start_server, model):
    """Waiting image requests with the same settings share a sampler call; other settings do not."""
    from lmfusion.serving.worker import ImageWork

    paused = start_server()
    release = threading.Event()
    paused.worker.submit_call(lambda cancelled: release.wait(120))
    jobs = [paused.worker.submit_images(ImageWork("a red circle", n, seed, steps, 1.6, None))
            for n, seed, steps in ((1, 1, STEPS), (2, 2, STEPS), (1, 3, STEPS + 1))]
    release.set()
    results = [job.future.result(120) for job in jobs]
    assert [len(images) for images in results] == [1, 2, 1]
    assert paused.worker.stats.batches == 2 and paused.worker.stats.largest_batch == 2


def _wait_until(condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
