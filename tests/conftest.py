"""Shared fixtures: real services on 127.0.0.1, started here and stopped by process id."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from ray_session import cluster_busy, cluster_report, stop_group
from tiers import leftover_state, service_command, unmarked_service_tests

from infra.processes import free_port
from orchestrator.ray_jobs import refresh_auth

BIN = Path(sys.executable).parent


def _wait_http(url: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"service exited early with status {process.returncode}: {url}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answered (e.g. 401 before the auth token): it is up
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"service did not answer at {url} within {timeout:.0f}s")


def _wait_job_agent(address: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until the head runs a job: its dashboard answers before its job agent has registered
    (submissions then fail with "No available agent to submit job")."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"ray exited early with status {process.returncode}"
        try:
            job = client.submit_job(entrypoint="true")
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    while (status := client.get_job_status(job)) != JobStatus.SUCCEEDED:
        assert not status.is_terminal(), f"the probe job ended {status}"
        assert time.monotonic() < deadline, "the head's job agent did not run a job in time"
        time.sleep(0.5)


# --- The user's home: a test run never writes to it --------------------------------------
# Session fixtures (the shared training runs) start before any function fixture, so the
# temporary M2D_HOME is set for the whole process here, and each test gets its own below.
_USER_HOME = Path(os.environ.get("M2D_HOME") or Path.home() / ".m2d")
_SESSION_HOME = tempfile.mkdtemp(prefix="m2d-test-home-")
os.environ["M2D_HOME"] = _SESSION_HOME


def _home_entries() -> set[str]:
    if not _USER_HOME.is_dir():
        return set()
    return {str(path.relative_to(_USER_HOME)) for path in _USER_HOME.rglob("*")}


_HOME_BEFORE = _home_entries()


def pytest_sessionfinish(session, exitstatus) -> None:
    """Fail the run if anything appeared under the user's own M2D_HOME."""
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)
    appeared = sorted(_home_entries() - _HOME_BEFORE)
    if appeared:
        shown = ", ".join(appeared[:5]) + (", ..." if len(appeared) > 5 else "")
        sys.stderr.write(f"\nerror: the tests wrote into the user's {_USER_HOME}: {shown}\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _m2d_home(tmp_path_factory, monkeypatch) -> None:
    """Every test's run records and job logs go to a temporary M2D_HOME, never ~/.m2d
    (a test that wants its own sets M2D_HOME after this)."""
    monkeypatch.setenv("M2D_HOME", str(tmp_path_factory.mktemp("m2d-home")))


# --- Tiers: what a fast test may not do (the rules: tests/tiers.py) --------------------


def pytest_collection_modifyitems(config, items) -> None:
    """A test that starts services or distributed jobs must say so: the fast tier is
    ``-m "not integration"``."""
    if unmarked := unmarked_service_tests(items):
        raise pytest.UsageError(
            "these tests start services or distributed jobs but are not marked "
            f"`integration` (pytestmark = pytest.mark.integration): {', '.join(unmarked)}"
        )


@pytest.fixture(autouse=True)
def _fast_tier_guard(request, monkeypatch) -> Iterator[None]:
    """A test without the `integration` mark starts no server, Ray or DeepSpeed process and
    leaves no Ray or torch.distributed state behind: `make test-fast` needs none of them."""
    if request.node.get_closest_marker("integration") is not None:
        yield
        return
    real_init = subprocess.Popen.__init__

    def guarded_init(self, args, *rest, **kwargs):
        started = service_command(args)
        if started is not None:
            pytest.fail(f"a fast test started {started}: mark it `integration`", pytrace=False)
        real_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_init)
    before = leftover_state()  # what an earlier test left is that test's to answer for
    yield
    if left := [state for state in leftover_state() if state not in before]:
        pytest.fail(f"a fast test left {' and '.join(left)}: mark it `integration`", False)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    """A real S3 API server (moto_server) on 127.0.0.1, with dummy credentials set."""
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    process = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    dummy = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    try:
        with mock.patch.dict(os.environ, dummy):
            _wait_http(f"{endpoint}/moto-api/", process)
            yield endpoint
    finally:
        stop_group(process)


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket on the session's S3 server; returns its name."""
    import boto3

    name = f"m2d-test-{time.monotonic_ns()}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """A real `mlflow server` with a sqlite backend on 127.0.0.1; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (root / "mlflow.log").open("w")
    process = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--default-artifact-root",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{uri}/health", process, timeout=120)
        yield uri
    finally:
        stop_group(process)
        shutil.rmtree(root / "artifacts", ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head_session(tmp_path_factory) -> Iterator[str]:
    """A real Ray head (`ray start --head --block`) on 127.0.0.1 with token auth on.

    Yields the dashboard (Jobs API) address. The token lives in a temporary file that
    this process and its children find through RAY_AUTH_TOKEN_PATH.
    """
    root = tmp_path_factory.mktemp("ray")
    token_path = root / "auth_token"
    token_path.write_text(secrets.token_hex(16))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    # Every port this head listens on is its own: Ray's defaults (the job agent's 52365)
    # may be held by another Ray on this machine - a second suite, or a leftover agent.
    port, dashboard_port, agent_port = free_port(), free_port(), free_port()
    log = (root / "ray.log").open("w")
    # Jobs run `python -m ...`: this virtualenv's python, as an image's would be.
    env = {**os.environ, **auth, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    process = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard_port),
            "--dashboard-agent-listen-port",
            str(agent_port),
            "--num-cpus",
            "2",
            "--disable-usage-stats",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        with mock.patch.dict(os.environ, auth):
            refresh_auth()  # a Ray used in this process before cached another token
            _wait_http(f"{address}/api/version", process, timeout=120)
            _wait_job_agent(address, process)
            yield address
    finally:
        stop_group(process)


@pytest.fixture
def ray_head(ray_head_session) -> str:
    """The session's Ray head once earlier tests' jobs have let go of it: a stopped job's
    actors and placement groups are freed asynchronously, and a job submitted before then
    waits for resources."""
    refresh_auth()  # an in-process Ray since (a local job's) may have cached its own token
    deadline = time.monotonic() + 120
    while cluster_busy(ray_head_session):
        assert time.monotonic() < deadline, cluster_report(ray_head_session)
        time.sleep(1)
    return ray_head_session
