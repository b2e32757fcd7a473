"""`lmfusion serve` as a user runs it: a subprocess that loads a checkpoint and stops cleanly."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lmfusion.cli import main
from serve_helpers import http

REPO = Path(__file__).resolve().parents[2]


def _start(checkpoint, *extra) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    process = subprocess.Popen(
        [sys.executable, "-m", "lmfusion.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0", "--threads", "1",
         "--steps", "2", "--log-level", "warning", *extra],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=REPO,
    )
    for line in process.stderr:  # the server prints its address once the model is loaded
        found = re.search(r"lmfusion serve: (http://127\.0\.0\.1:\d+)/", line)
        if found:
            return process, found.group(1)
    process.wait(10)
    pytest.fail(f"lmfusion serve exited {process.returncode} before it was ready")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_answers_with_its_key_and_exits_0_on_a_signal_after_finishing_in_flight_work(checkpoint, stop):
    # A long shutdown timeout: on a loaded machine the in-flight image may take a while.
    process, url = _start(checkpoint, "--api-key", "sesame", "--shutdown-timeout", "600")
    try:
        assert http("GET", f"{url}/v1/models")[0] == 401
        key = {"Authorization": "Bearer sesame"}
        assert http("GET", f"{url}/v1/models", headers=key)[2]["data"][0]["id"] == "lmfusion"
        in_flight = {}
        request = {"prompt": "a red circle", "steps": 100, "seed": 1}  # long enough to be running at the signal
        thread = threading.Thread(target=lambda: in_flight.update(
            reply=http("POST", f"{url}/v1/images/generations", request, headers=key)))
        thread.start()
        while http("GET", f"{url}/health")[2]["queue"]["running"] == 0 and thread.is_alive():
            time.sleep(0.01)
        process.send_signal(stop)
        thread.join(600)
        assert process.wait(600) == 0
        status, _, body = in_flight["reply"]
        assert status == 200 and len(body["data"]) == 1  # the running request was finished, not dropped
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()


def test_a_busy_port_or_a_missing_checkpoint_is_one_line(checkpoint, tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", str(checkpoint), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err
    assert main(["serve", "--checkpoint", str(tmp_path / "nope"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmfusion serve: error:") and "Traceback" not in err
    assert main(["serve", "--checkpoint", str(checkpoint), "--max-queue", "0"]) == 2
    assert "--max-queue" in capsys.readouterr().err
