"""MLflow tracking through ``MlflowClient``: one run per launch, written from one process.

The tracking URI comes from the run config; a token, if the server needs one, only from
``MLFLOW_TRACKING_TOKEN`` in the environment (MLflow reads it itself). Params are the
resolved config flattened to dotted keys; nothing secret is ever put there (the config
holds no credentials, and keys that look like credentials are dropped anyway).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from infra.config import RunConfig, looks_secret

__all__ = ["Tracker", "flatten", "run_params"]

# MLflow limits a param value to 6000 characters and a batch to 100 params.
_MAX_VALUE = 6000
_PARAM_BATCH = 100
_METRIC_BATCH = 1000


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; values as strings, credential-like keys dropped."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if looks_secret(str(key)):
            continue
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:_MAX_VALUE]
    return flat


def run_params(run: RunConfig) -> dict[str, str]:
    """The params of a run: its resolved config, flattened."""
    return flatten(run.model_dump(mode="json"))


class Tracker:
    """A thin ``MlflowClient`` wrapper bound to one MLflow run."""

    def __init__(self, uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id

    @classmethod
    def create(
        cls, run: RunConfig, run_name: str, tags: Mapping[str, str] | None = None
    ) -> Tracker:
        """Create the MLflow run of ``run`` (experiment created if missing), log its params."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=run.tracking.uri)
        experiment = client.get_experiment_by_name(run.tracking.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(run.tracking.experiment)
        )
        all_tags = {"cluster": run.cluster, "stage": run.stage, **(tags or {})}
        created = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        tracker = cls(run.tracking.uri, created.info.run_id)
        tracker.log_params(run_params(run))
        return tracker

    @property
    def url(self) -> str:
        """Where a person finds the run (the server's UI for http(s) URIs)."""
        run = self.client.get_run(self.run_id)
        uri = str(self.client.tracking_uri)
        if uri.startswith(("http://", "https://")):
            return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{self.run_id}"
        return f"{uri} run {self.run_id}"

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), _PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + _PARAM_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log numeric metrics at ``step`` in one request (None values are skipped)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if value is not None
        ]
        for start in range(0, len(items), _METRIC_BATCH):
            self.client.log_batch(self.run_id, metrics=items[start : start + _METRIC_BATCH])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED``."""
        self.client.set_terminated(self.run_id, status=status)

    def reopen(self) -> None:
        """Mark a resumed run as running again."""
        self.client.update_run(self.run_id, status="RUNNING")
