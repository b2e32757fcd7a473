"""Running the app: uvicorn on a socket we bind ourselves, stopping cleanly on SIGINT/SIGTERM.

On the first signal the worker stops taking jobs and cancels the waiting ones (their clients
get 503 at once), the running batch finishes (its clients get their answer if that takes less
than the shutdown timeout, else their connection is closed), and the process exits 0 once the
worker thread is done. Binding before the model loads makes a busy port a one-line error in a second.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time

import uvicorn

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulServer(uvicorn.Server):
    """uvicorn, plus a hook on the first exit signal, and an exit code of 0 after it.

    Stock uvicorn re-raises the signal once it has shut down (so SIGINT ends as
    KeyboardInterrupt and SIGTERM kills the process): a server that stopped as asked
    should instead return normally.
    """

    def __init__(self, config: uvicorn.Config, on_exit=None):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        if self.on_exit is not None and not self.should_exit:
            self.on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; OSError with a plain message if it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error}") from error
    # Listening at once: a client that connects while the model loads waits in the backlog
    # instead of being refused.
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_server(app, sock: socket.socket, log_level: str = "info", shutdown_timeout: float = 30.0) -> GracefulServer:
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=max(1, round(shutdown_timeout)), lifespan="on",
                            access_log=log_level == "debug")
    return GracefulServer(config, on_exit=app.state.worker.begin_shutdown)


def serve(app, sock: socket.socket, log_level: str = "info", shutdown_timeout: float = 30.0) -> None:
    """Serve until a signal stops it (blocking)."""
    make_server(app, sock, log_level, shutdown_timeout).run(sockets=[sock])


class ServerThread:
    """Serve `app` from a background thread on host:port (0 = a free port), e.g. for tests,
    benchmarks or a notebook: `with ServerThread(app) as server: ... server.url ...`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", start_timeout: float = 30.0):
        self.app = app
        sock = bind(host, port)
        self.port = sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = make_server(app, sock, log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)

    @property
    def worker(self):
        return self.app.state.worker

    def stop(self, timeout: float = 30.0) -> None:
        self.app.state.worker.begin_shutdown()
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
