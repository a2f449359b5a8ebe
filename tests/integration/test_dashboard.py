"""`m2d dashboard`: a bad or taken port is one line (exit 2); stopping it stops the MLflow
server and every process it started."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from infra.processes import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
M2D = str(Path(sys.executable).parent / "m2d")


def dashboard(tmp_path: Path, *args: str) -> list[str]:
    """The command, run from ``tmp_path`` where the `local` profile's store now is (an
    empty sqlite file: MLflow makes its tables in it)."""
    (tmp_path / "runs").mkdir(exist_ok=True)
    (tmp_path / "runs" / "mlflow.db").touch()
    return [M2D, "--clusters-dir", str(ROOT / "clusters"), "dashboard", "--cluster", "local", *args]


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_invalid_port_is_one_line(tmp_path, port):
    result = subprocess.run(
        dashboard(tmp_path, "--port", port), cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr
    assert "--port" in result.stderr and "Traceback" not in result.stderr


def test_taken_port_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            dashboard(tmp_path, "--port", str(port)), cwd=tmp_path, capture_output=True, text=True
        )
    assert result.returncode == 2, result.stderr
    assert f"127.0.0.1:{port} is in use" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        return True
    except OSError:
        return False


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_stopping_it_stops_the_server_and_its_workers(tmp_path, stop):
    port = free_port()
    process = subprocess.Popen(
        dashboard(tmp_path, "--port", str(port)),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # As from a terminal: a suite started in the background (`make test &`) hands its
        # children SIGINT ignored, and Python then keeps ignoring it (no Ctrl-C).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while not _answers(port):
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the UI never answered"
            time.sleep(0.5)
        started = psutil.Process(process.pid).children(recursive=True)
        assert len(started) >= 2  # mlflow server, uvicorn, MLflow's job runners
        process.send_signal(stop)
        assert process.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(started, timeout=30)
        assert alive == [], [p.cmdline() for p in alive]
        assert not _answers(port)
    finally:
        if process.poll() is None:
            process.kill()
