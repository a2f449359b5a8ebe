"""Run state changes posted to a webhook (``notify.webhook_env`` of a profile).

Each post is one JSON object: ``run``, ``event`` (``started``, ``checkpoint``,
``restarted``, ``finished`` or ``failed``), ``stage``, ``cluster``, ``time`` (UTC, ISO
8601), ``mlflow`` (the run's page; its validation contact sheets are its images) and
what the event adds (``step``, ``checkpoint``, ``error``). Posts go in order, each
waited for, as the checkpoint's MLflow record is: a webhook that fails or does not answer
within ``notify.timeout_s`` costs that wait and one warning line - never the webhook's URL,
which is a secret - and never the run.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from typing import Any

from infra.config import RunConfig
from infra.logging import get_logger

log = get_logger("notify")


class Notifier:
    """Posts one run's events; does nothing where no webhook is set."""

    def __init__(self, run: RunConfig, name: str, mlflow_url: str = "") -> None:
        env = run.notify.webhook_env
        self.url = (os.environ.get(env) or None) if env else None
        self.timeout_s = run.notify.timeout_s
        self.base = {"run": name, "stage": run.stage, "cluster": run.cluster, "mlflow": mlflow_url}

    def post(self, event: str, **fields: Any) -> None:
        """Post ``event`` with ``fields``; returns once it is answered or has failed."""
        if self.url is None:
            return
        body = {**self.base, "event": event, **fields}
        body["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        request = urllib.request.Request(
            self.url,  # type: ignore[arg-type]
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                answer.read()
        except Exception as exc:  # HTTPError, URLError, timeouts...: the run goes on
            why = getattr(exc, "code", None) or type(exc).__name__
            log.warning("notify: the webhook did not take the %r post (%s)", body["event"], why)
