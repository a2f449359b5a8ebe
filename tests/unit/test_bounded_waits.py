"""Bounded waits (issue 27 point 6): every request m2d makes waits at most
``M2D_NETWORK_TIMEOUT_S`` for a server, then fails in one line naming it. The CLI cases run
against a server that accepts and never answers in tests/corpus/cli.yaml."""

from __future__ import annotations

import os
import time

import pytest
from tcp_proxy import SwitchProxy

from infra.errors import ConfigError, ServiceError
from infra.timeouts import NETWORK_TIMEOUT_ENV, network_timeout_s


@pytest.fixture
def silent():
    """The URL of a server that accepts connections and never answers."""
    with SwitchProxy(upstream_port=9) as server:
        server.blackhole = True
        yield f"http://127.0.0.1:{server.port}"


def test_the_wait_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(NETWORK_TIMEOUT_ENV, raising=False)
    assert network_timeout_s() == 30.0
    monkeypatch.setenv(NETWORK_TIMEOUT_ENV, "2.5")
    assert network_timeout_s() == 2.5
    for bad in ("soon", "0", "-1", "inf", "nan"):
        monkeypatch.setenv(NETWORK_TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=f"{NETWORK_TIMEOUT_ENV}="):
            network_timeout_s()


def test_object_store_requests_are_bounded(monkeypatch):
    from infra.config import StorageConfig
    from infra.storage import S3_TRIES, filesystem, storage_options

    monkeypatch.setenv(NETWORK_TIMEOUT_ENV, "7")
    options = storage_options(StorageConfig(root="s3://b", endpoint_url="http://127.0.0.1:1"))
    assert options["config_kwargs"] == {
        "connect_timeout": 7.0,
        "read_timeout": 7.0,
        "retries": {"max_attempts": 1},  # botocore's default: 5 attempts of 60 s
    }
    assert options["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:1"}
    fs, _ = filesystem("s3://b/x", StorageConfig(root="s3://b", endpoint_url="http://h:1"))
    assert fs.retries == S3_TRIES < 5  # s3fs' class default
    local, _ = filesystem("memory://m2d-bounded/x")
    assert not hasattr(local, "retries") or local.retries != S3_TRIES


def test_the_ray_job_client_gives_up_on_a_silent_cluster(silent, monkeypatch):
    from orchestrator.ray_jobs import job_client

    monkeypatch.setenv(NETWORK_TIMEOUT_ENV, "1")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    start = time.monotonic()
    with pytest.raises(ServiceError) as refused:
        job_client(silent)
    assert time.monotonic() - start < 10
    assert str(refused.value) == (
        f"the Ray cluster at {silent} did not answer within 1 s; check that its head node "
        f"runs and that ray.address is its dashboard address ({NETWORK_TIMEOUT_ENV} sets the "
        "wait)"
    )


def test_the_jobs_mlflow_run_is_opened_with_bounded_tries(monkeypatch):
    """A store that answers with errors (a read-only one) is tried three times with the
    bounded wait, then the job stops in one line - not MLflow's minutes of backoff."""
    from types import SimpleNamespace

    from mlflow.exceptions import MlflowException

    from trainer import job

    seen = []

    def refuse(*args):
        seen.append(
            (
                os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"],
                os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"],
            )
        )
        raise MlflowException("attempt to write a readonly database")

    monkeypatch.setattr(job, "open_run", refuse)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv(NETWORK_TIMEOUT_ENV, "4")
    folder = SimpleNamespace(
        name="r1",
        uri="/runs/r1",
        run=SimpleNamespace(tracking=SimpleNamespace(uri="http://m:5000")),
    )
    with pytest.raises(ServiceError) as refused:
        job._open_tracking(folder, {})
    assert seen == [("2", "4")]
    assert str(refused.value) == (
        "tracking.uri http://m:5000: the MLflow store did not take the run (attempt to write a "
        "readonly database); fix the store (or tracking.uri), then `m2d launch --resume r1`"
    )
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # restored after
