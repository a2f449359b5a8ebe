"""How long m2d waits for a server that accepts a connection and then says nothing.

Every request m2d makes - to the Ray Jobs and State APIs, to MLflow, to an object store -
waits at most ``network_timeout_s()`` for an answer (``M2D_NETWORK_TIMEOUT_S``, 30 s by
default) and then fails in one line naming the server; without it the libraries wait
forever (Ray's job client), for minutes (botocore: 60 s a try, several tries) or retry
with backoff (MLflow). A training job's storage operations are still retried for
``fault_tolerance.storage_retry_s`` around each bounded request (``infra.storage``).
"""

from __future__ import annotations

import os

from infra.errors import ConfigError

__all__ = ["NETWORK_TIMEOUT_ENV", "network_timeout_s"]

NETWORK_TIMEOUT_ENV = "M2D_NETWORK_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 30.0


def network_timeout_s() -> float:
    """Seconds one request may wait for a server's answer."""
    value = os.environ.get(NETWORK_TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ConfigError(
            f"{NETWORK_TIMEOUT_ENV}={value!r}: give the seconds a request may wait for a "
            "server, a positive number (or unset it: 30)"
        )
    return seconds
