"""A tiny random LMFusion model and live servers on 127.0.0.1, built once and shared.

The model is the sampling tests' "peaky" one (logits peaked so greedy text varies, the noise
head re-drawn so images depend on the model), saved to disk so a subprocess can load it too.
Servers run in-process on a background thread (uvicorn on a free port), so tests can compare
what the API returns with the sampling functions called directly on the same model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

from lmfusion.serving.app import ServeSettings, create_app  # noqa: E402
from lmfusion.serving.server import ServerThread  # noqa: E402
from serve_helpers import STEPS, build_tiny_model  # noqa: E402


@pytest.fixture(scope="package")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("serve_model"))


@pytest.fixture(scope="package")
def model(tiny):
    return tiny[0]


@pytest.fixture(scope="package")
def checkpoint(tiny) -> Path:
    return tiny[1]


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """Tiny models: one torch thread is faster, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def start_server(model):
    """start_server(**settings) -> a ServerThread over the shared model; all stop at the end."""
    servers = []

    def start(**settings) -> ServerThread:
        server = ServerThread(create_app(model, ServeSettings(**{"steps": STEPS, **settings})))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="package")
def server(start_server) -> ServerThread:
    """The shared server: default settings (batching on, no key), STEPS steps by default."""
    return start_server()


@pytest.fixture()
def client(server):
    openai = pytest.importorskip("openai", reason="the test extra is not installed (pip install -e '.[test]')")
    # No retries: a 503 must reach the test, not be retried away.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
