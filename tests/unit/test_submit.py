"""Submitting to a Ray cluster whose job agent is not up yet (a head just started)."""

from __future__ import annotations

import pytest

from infra.errors import ServiceError
from orchestrator import ray_jobs

NO_AGENT = RuntimeError(
    "Request failed with status code 500: No available agent to submit job, please try again later."
)


class Clock:
    """time.monotonic and time.sleep of a fake clock: sleeping advances it."""

    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Client:
    """A JobSubmissionClient whose first ``failures`` submissions raise ``error``."""

    def __init__(self, failures: int, error: Exception = NO_AGENT) -> None:
        self.failures, self.error, self.calls = failures, error, []

    def submit_job(self, **kwargs) -> str:
        self.calls.append(kwargs)
        if len(self.calls) <= self.failures:
            raise self.error
        return "raysubmit_1"


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(ray_jobs.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(ray_jobs.time, "sleep", clock.sleep)
    return clock


def test_waits_for_the_job_agent_with_backoff_and_one_line(clock):
    client, lines = Client(failures=5), []
    job_id = ray_jobs.submit_job(client, "the job x", echo=lines.append, entrypoint="true")
    assert job_id == "raysubmit_1" and len(client.calls) == 6
    assert all(call == {"entrypoint": "true"} for call in client.calls)
    assert clock.sleeps == [1.0, 2.0, 4.0, 8.0, 10.0]
    assert lines == ["waiting for the Ray cluster's job agent (up to 120 s) ..."]


def test_gives_up_within_the_bound_in_one_line(clock):
    client = Client(failures=10**6)
    with pytest.raises(ServiceError, match=r"the job x: the cluster's job agent did not answer"):
        ray_jobs.submit_job(client, "the job x", echo=lambda line: None, entrypoint="true")
    assert clock.now <= ray_jobs.AGENT_WAIT_S
    assert clock.now + 10.0 > ray_jobs.AGENT_WAIT_S  # it did wait about that long


def test_other_refusals_are_not_retried(clock):
    client = Client(failures=1, error=RuntimeError("Job with submission_id x already exists"))
    with pytest.raises(ServiceError, match="Ray refused the job x: Job with submission_id"):
        ray_jobs.submit_job(client, "the job x", echo=lambda line: None, entrypoint="true")
    assert len(client.calls) == 1 and clock.sleeps == []
