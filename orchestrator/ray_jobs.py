"""The Ray Jobs API, as m2d calls it: a client per cluster address, submissions that wait
for a cluster just brought up, and calls about a run's job - each failure one line."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from infra.errors import ServiceError, first_line
from infra.timeouts import NETWORK_TIMEOUT_ENV, network_timeout_s

# How long a submission waits for the cluster's job agent: Ray's head answers "No available
# agent to submit job" until the agent on the head node has registered, seconds to about
# a minute after `ray start --head` on a busy machine.
AGENT_WAIT_S = 120.0


def client_auth() -> None:
    """Send the cluster's token where one is at hand: Ray's clients send it only in token
    mode (``RAY_AUTH_MODE=token``), which a user's shell rarely sets, while Ray's own
    clusters ask for it by default. An explicit mode (``disabled`` too) is left alone.
    Call before a Ray client call: Ray caches the mode, so a change is pushed to it."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file)):
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    refresh_auth()


def refresh_auth() -> None:
    """Make this process's Ray read ``RAY_AUTH_*`` again: it caches the mode and the token
    the first time it needs them (nothing to do before Ray is imported)."""
    if "ray._raylet" not in sys.modules:
        return
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def job_client(address: str):
    """A Ray Jobs client whose every request waits at most ``network_timeout_s()`` (Ray's
    own waits forever on a server that accepts and never answers); the auth token comes
    from RAY_AUTH_TOKEN(_PATH) or ~/.ray."""
    client_auth()
    from ray.job_submission import JobSubmissionClient

    timeout = network_timeout_s()

    class BoundedClient(JobSubmissionClient):
        def _do_request(self, method, endpoint, **kwargs):
            kwargs.setdefault("timeout", timeout)
            return super()._do_request(method, endpoint, **kwargs)

    try:
        return BoundedClient(address)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError...
        if silent := no_answer(exc, address):
            raise ServiceError(silent) from None
        raise ServiceError(
            f"cannot reach the Ray cluster at {address} ({first_line(exc)}); check that it "
            "runs and that ray.address in the cluster profile is its dashboard address"
        ) from None


def no_answer(exc: BaseException, address: str) -> str | None:
    """The line for a request to the Ray cluster at ``address`` that timed out (None for
    any other failure)."""
    import requests

    if not isinstance(exc, requests.exceptions.Timeout):
        return None
    return (
        f"the Ray cluster at {address} did not answer within {network_timeout_s():g} s; "
        "check that its head node runs and that ray.address is its dashboard address "
        f"({NETWORK_TIMEOUT_ENV} sets the wait)"
    )


def submit_job(client, what: str, echo: Callable[[str], None] = print, **kwargs: Any) -> str:
    """``client.submit_job(**kwargs)``; its job id.

    While the cluster's job agent is not up yet (a cluster just started), the submission is
    retried with backoff for up to ``AGENT_WAIT_S`` seconds, saying so in one line; any
    other refusal, or the agent still missing then, is a one-line ServiceError about
    ``what``.
    """
    deadline, delay, waiting = time.monotonic() + AGENT_WAIT_S, 1.0, False
    while True:
        try:
            return client.submit_job(**kwargs)
        except Exception as exc:  # Ray raises RuntimeError, ValueError, ConnectionError...
            if silent := no_answer(exc, getattr(client, "_address", "")):
                raise ServiceError(f"{what}: {silent}") from None
            if "No available agent" not in str(exc):
                raise ServiceError(f"Ray refused {what}: {first_line(exc)}") from None
        if time.monotonic() + delay > deadline:
            raise ServiceError(
                f"Ray refused {what}: the cluster's job agent did not answer within "
                f"{AGENT_WAIT_S:.0f} s; check the head node (`ray status`, its "
                "dashboard_agent.log) and submit again"
            )
        if not waiting:
            echo(f"waiting for the Ray cluster's job agent (up to {AGENT_WAIT_S:.0f} s) ...")
            waiting = True
        time.sleep(delay)
        delay = min(2 * delay, 10.0)


class RunJob(Protocol):
    """What a call about a run's job needs of its record (``runs.RunRecord``)."""

    name: str
    address: str

    @property
    def ray_job(self) -> str: ...


def remote_call(record: RunJob, method: str, *args):
    """Call a JobSubmissionClient method for this run, as a one-line ServiceError on failure."""
    client = job_client(record.address)
    try:
        return getattr(client, method)(record.ray_job, *args)
    except Exception as exc:
        why = no_answer(exc, record.address) or first_line(exc)
        raise ServiceError(f"{method} for run {record.name}: {why}") from None
