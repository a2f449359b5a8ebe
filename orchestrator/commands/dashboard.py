"""``m2d dashboard``: the MLflow UI of a cluster profile's tracking store.

The UI is an ``mlflow server`` (uvicorn plus MLflow's job-runner processes) in a process
group of its own, so that Ctrl-C in the terminal reaches only ``m2d``: whatever stops
``m2d`` (Ctrl-C, SIGTERM, SIGHUP) stops that whole group before ``m2d`` exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import click

from infra.processes import port_in_use
from orchestrator import profiles
from orchestrator.cli import UserError
from orchestrator.completion import cluster_option

STARTUP_S = 120.0  # MLflow creates its tables on a new store first
STOP_S = 15.0
#: Not 5000: that is the local stack's MLflow server (clusters/localstack.yaml), which a
#: dashboard of another profile must not collide with.
DEFAULT_PORT = 5050


def ui_command(tracking_uri: str, port: int) -> list[str]:
    """`mlflow server` on 127.0.0.1 over a local tracking store (sqlite or a folder)."""
    mlflow = Path(sys.executable).with_name("mlflow")
    return [
        str(mlflow),
        "server",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def check_port(port: int) -> None:
    """Refuse a port something on 127.0.0.1 already listens on (the server would fail
    after its start-up, or a user would read another server's UI)."""
    if port_in_use(port):
        raise UserError(
            f"--port {port}: 127.0.0.1:{port} is in use; stop what listens there or pass "
            "another --port"
        )


def check_store(uri: str, cluster_name: str) -> None:
    """Refuse a local store that is not there: MLflow would create an empty one and serve
    an empty UI (a relative path read from another folder than the runs' is the usual
    cause)."""
    path = _local_store(uri)
    if path is None or path.exists():
        return
    raise UserError(
        f"tracking.uri = {uri}: no MLflow store at {path.absolute()} yet; run `m2d dashboard` "
        f"from the folder the runs were launched in, or launch a run of {cluster_name} first"
    )


def _local_store(uri: str) -> Path | None:
    """The file or folder of a local tracking store (None: a server or database)."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file://").removeprefix("file:"))
    return Path(uri) if "://" not in uri else None


@contextlib.contextmanager
def _stops_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP end the command like Ctrl-C does (KeyboardInterrupt)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop(process: subprocess.Popen) -> int:
    """Stop the server's whole process group; its exit status."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


def _wait_until_up(process: subprocess.Popen, port: int) -> None:
    """Until the server answers on ``port``; a ClickException if it exits or stays silent."""
    deadline = time.monotonic() + STARTUP_S
    while True:
        code = process.poll()
        if code is not None:
            raise click.ClickException(f"the MLflow UI exited with status {code} at start-up")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            if time.monotonic() > deadline:
                raise click.ClickException(
                    f"the MLflow UI did not answer on 127.0.0.1:{port} within {STARTUP_S:.0f} s"
                ) from None
            time.sleep(0.5)


@click.command()
@cluster_option(required=True)
@click.option(
    "--port",
    default=DEFAULT_PORT,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Local port of the UI.",
)
@click.pass_context
def dashboard(ctx: click.Context, cluster_name: str, port: int) -> None:
    """Open the MLflow UI of CLUSTER's tracking URI on 127.0.0.1 (Ctrl-C stops it)."""
    directory = profiles.clusters_dir(ctx.find_root().obj["clusters_dir"])
    tracking = profiles.load_profile(
        profiles.find_profile(cluster_name, directory)
    ).profile.tracking
    if tracking.uri.startswith(("http://", "https://")):
        # A tracking server already serves its UI; nothing to start.
        click.echo(f"MLflow UI: {tracking.uri} (experiment {tracking.experiment})")
        return
    check_store(tracking.uri, cluster_name)
    check_port(port)
    with _stops_on_signals():
        process = subprocess.Popen(ui_command(tracking.uri, port), start_new_session=True)
        try:
            _wait_until_up(process, port)
            click.echo(f"MLflow UI: http://127.0.0.1:{port} (experiment {tracking.experiment})")
            code = process.wait()
        except KeyboardInterrupt:
            code = None
        finally:
            _stop(process)  # also when it exited: MLflow's job runners may outlive it
    if code:
        raise click.ClickException(f"the MLflow UI exited with status {code}")
