"""MLflow tracking through ``MlflowClient``: one run per launch, written from one process.

The tracking URI comes from the run config; a token, if the server needs one, only from
``MLFLOW_TRACKING_TOKEN`` in the environment (MLflow reads it itself). Params are the
resolved config flattened to dotted keys; nothing secret is ever put there (the config
holds no credentials, and keys that look like credentials are dropped anyway).

A training run's MLflow run id is kept in its run folder (``mlflow_run.json``):
``open_run`` creates the MLflow run once - from the launcher where it can reach the
store, else from the job - and every later start of the same folder (a resume, a restart)
continues it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from infra.config import RunConfig, StorageConfig, TrackingConfig, looks_secret
from infra.errors import DataError, ServiceError, first_line
from infra.logging import get_logger
from infra.run_folder import read_trainer_state
from infra.storage import filesystem, join
from infra.timeouts import NETWORK_TIMEOUT_ENV, network_timeout_s

__all__ = [
    "MLFLOW_RUN_FILE",
    "Tracker",
    "check_store",
    "end_run",
    "fail_fast",
    "flatten",
    "is_server",
    "open_run",
    "run_id_in",
    "run_params",
    "store_exists",
]

log = get_logger("infra.tracking")

MLFLOW_RUN_FILE = "mlflow_run.json"  # in a run folder: {"run_id": its MLflow run}

# MLflow limits a param value to 6000 characters and a batch to 100 params.
_MAX_VALUE = 6000
_IMAGE_NAME = re.compile(
    r"images/(?P<key>.+)[+%]step[+%](?P<step>\d+)[+%]timestamp[+%]\d+[+%][^+%]+\.png"
)
_PARAM_BATCH = 100
_METRIC_BATCH = 1000
# Unfinished runs looked at when resuming one: the latest of an experiment.
_SEARCH_RESULTS = 100


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
        """Create the MLflow run of a training ``run``, with its params."""
        all_tags = {"cluster": run.cluster, "stage": run.stage, **(tags or {})}
        return cls.start(run.tracking, run_name, tags=all_tags, params=run_params(run))

    @classmethod
    def start(
        cls,
        tracking: TrackingConfig,
        run_name: str,
        tags: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Tracker:
        """Create an MLflow run in ``tracking.experiment`` (created if missing)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking.uri)
        experiment_id = _experiment_id(client, tracking)
        created = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
        tracker = cls(tracking.uri, created.info.run_id)
        tracker.log_params(params or {})
        return tracker

    @classmethod
    def find_unfinished(
        cls, tracking: TrackingConfig, tags: Mapping[str, str], params: Mapping[str, str]
    ) -> Tracker | None:
        """The latest run of ``tracking.experiment`` with these tags and params that did not
        finish (its job was killed or failed part-way), or ``None``."""
        for run in _latest_runs(tracking, "attributes.status != 'FINISHED'"):
            same_tags = all(run.data.tags.get(key) == value for key, value in tags.items())
            if same_tags and run.data.params == dict(params):
                return cls(tracking.uri, run.info.run_id)
        return None

    @property
    def url(self) -> str:
        """Where a person finds the run (the server's UI for http(s) URIs)."""
        return self._url(self.client.get_run(self.run_id))

    def latest(self) -> tuple[str, dict[str, float]]:
        """The run's URL and each metric's latest value (``step``, ``loss`` for a training
        run), from one request."""
        run = self.client.get_run(self.run_id)
        return self._url(run), dict(run.data.metrics)

    def _url(self, run: Any) -> str:
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

        self.log_rows([(step, int(time.time() * 1000), metrics)])

    def log_rows(self, rows: Sequence[tuple[int, int, Mapping[str, float]]]) -> None:
        """Log several steps' metrics, ``(step, timestamp ms, metrics)`` each, in few requests."""
        items = _metric_items(rows)
        for start in range(0, len(items), _METRIC_BATCH):
            self.client.log_batch(self.run_id, metrics=items[start : start + _METRIC_BATCH])

    def log_checkpoint(self, uri: str, step: int) -> None:
        """Record a reported checkpoint: an artifact ``checkpoints/<name>.json`` holding its
        URI, step and time, and the tags ``checkpoint.latest`` / ``checkpoint.latest_step``.
        """
        import time

        name = uri.rstrip("/").rsplit("/", 1)[-1]
        record = {
            "uri": uri,
            "step": step,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.client.log_dict(self.run_id, record, f"checkpoints/{name}.json")
        self.set_tags({"checkpoint.latest": uri, "checkpoint.latest_step": str(step)})

    def metric_history(self, key: str) -> dict[int, float]:
        """Metric ``key`` by step; a step logged twice (a restart redid it) holds its
        latest value."""
        history = sorted(self.client.get_metric_history(self.run_id, key), key=_logged_order)
        return {m.step: m.value for m in history}

    def last_step(self, key: str) -> int:
        """The highest step at which metric ``key`` was logged (0 if never)."""
        history = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=0)

    def log_image(self, path: str | os.PathLike, key: str, step: int) -> None:
        """Log an image file under ``key`` at ``step`` (the UI's step slider pages them)."""
        from PIL import Image

        with Image.open(path) as image:
            self.client.log_image(self.run_id, image.convert("RGB"), key=key, step=step)

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str) -> None:
        """Upload a local folder's files under ``artifact_path``."""
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def logged_images(self) -> Counter[tuple[str, int]]:
        """How many images ``log_image`` put in the run under each (key, step).

        Read from the artifact names MLflow gives them,
        ``images/KEY+step+STEP+timestamp+MS+UUID.png`` ('%' separators before MLflow
        3.5); their ``+compressed.webp`` thumbnails are not counted.
        """
        found: Counter[tuple[str, int]] = Counter()
        for entry in self.client.list_artifacts(self.run_id, "images"):
            name = _IMAGE_NAME.fullmatch(entry.path)
            if name and not entry.is_dir:
                found[name["key"].replace("~", "/"), int(name["step"])] += 1
        return found

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED``."""
        self.client.set_terminated(self.run_id, status=status)

    def reopen(self) -> None:
        """Mark a resumed run as running again."""
        self.client.update_run(self.run_id, status="RUNNING")


def _metric_items(rows: Sequence[tuple[int, int, Mapping[str, float]]]) -> list[Any]:
    """MLflow ``Metric`` items of ``(step, timestamp ms, metrics)`` rows (None values out)."""
    from mlflow.entities import Metric

    return [
        Metric(key, float(value), timestamp, step)
        for step, timestamp, metrics in rows
        for key, value in metrics.items()
        if value is not None
    ]


def _logged_order(metric: Any) -> tuple[int, int]:
    return metric.step, metric.timestamp


#: Steps averaged at each end of a run for its loss trend: one step's loss is noisy.
TREND_STEPS = 20


def loss_trend(losses: Mapping[int, float], window: int = TREND_STEPS) -> str | None:
    """ "loss 0.912 -> 0.254 (0.28x) ..." - the mean loss of the first and of the last
    ``window`` steps, for a run of at least twice that many steps (else None)."""
    if len(losses) < 2 * window:
        return None
    ordered = [losses[step] for step in sorted(losses)]
    first, last = sum(ordered[:window]) / window, sum(ordered[-window:]) / window
    ratio = f"{last / first:.2f}x" if first else "-"
    return (
        f"loss {first:.4f} -> {last:.4f} ({ratio}): the mean of the first and last {window} steps"
    )


def sample_run_of(tracking: TrackingConfig, out: str) -> Tracker | None:
    """The latest sample-batch run of ``tracking.experiment`` that wrote into ``out`` (its
    ``m2d.out`` tag), or None."""
    for run in _latest_runs(tracking, "tags.stage = 'sample'"):
        if run.data.tags.get("m2d.out") == out:
            return Tracker(tracking.uri, run.info.run_id)
    return None


def _latest_runs(tracking: TrackingConfig, filter_string: str) -> list[Any]:
    """The newest runs of ``tracking.experiment`` that match ``filter_string`` (none if the
    experiment does not exist). Callers compare tags themselves: MLflow's filter strings
    cannot quote every value (a path may hold a quote)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.uri)
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return []
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=filter_string,
        order_by=["attributes.start_time DESC"],
        max_results=_SEARCH_RESULTS,
    )


PENDING_METRICS = "mlflow_pending.jsonl"


class MetricWriter:
    """Metrics for one MLflow run, written by a background thread so that the training
    step never waits on the tracking server.

    ``submit`` queues rows and returns at once. The thread sends them in batches, each
    request failing fast (no MLflow retries, ``timeout_s``); a batch the server did not
    take stays queued, in order, and is sent again after a backoff (1 s doubling to 30 s),
    so a server that is down or does not answer costs no step time and loses nothing: its
    metrics arrive when it is back. A batch leaves the queue only once the server took it,
    so nothing is logged twice (unless a request times out after the server stored it).
    ``close`` flushes within ``flush_s`` and returns the rows still unsent (the caller
    keeps them: ``spill``).
    """

    def __init__(self, tracker: Tracker, timeout_s: int = 10, warn=None) -> None:
        import threading

        self.tracker, self.timeout_s = tracker, timeout_s
        self.warn = warn or (lambda message: None)
        self.queue: list[Any] = []  # mlflow Metric items, in order
        self.lock = threading.Condition()
        self.closing = False
        self.failing = False  # since the last request the server took
        self.thread = threading.Thread(target=self._run, name="m2d-mlflow", daemon=True)
        self.thread.start()

    def submit(self, rows: Sequence[tuple[int, int, Mapping[str, float]]]) -> None:
        items = _metric_items(rows)
        with self.lock:
            self.queue.extend(items)
            self.lock.notify()

    def _run(self) -> None:
        delay = 1.0
        while True:
            with self.lock:
                while not self.queue and not self.closing:
                    self.lock.wait()
                if not self.queue and self.closing:
                    return
                batch = self.queue[:_METRIC_BATCH]
            if self._send(batch):
                with self.lock:
                    del self.queue[: len(batch)]
                    self.lock.notify_all()
                delay = 1.0
                continue
            with self.lock:
                if self.closing:
                    self.lock.notify_all()
                    return
                self.lock.wait(timeout=delay)
            delay = min(2 * delay, 30.0)

    def _send(self, batch: list[Any]) -> bool:
        try:
            with fail_fast(self.timeout_s):
                self.tracker.client.log_batch(self.tracker.run_id, metrics=batch)
        except Exception as exc:  # MLflow raises MlflowException, requests' errors...
            if not self.failing:
                self.failing = True
                self.warn(
                    f"MLflow at {self.tracker.client.tracking_uri} does not take metrics "
                    f"({type(exc).__name__}); training goes on, its metrics wait here"
                )
            return False
        if self.failing:
            self.warn(f"MLflow answers again: sending {len(self.queue)} queued metric(s)")
            self.failing = False
        return True

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the queue to empty; whether it did. A thread that
        is backing off tries again now."""
        import time

        deadline = time.monotonic() + timeout_s
        with self.lock:
            self.lock.notify_all()
            while self.queue and time.monotonic() < deadline:
                self.lock.wait(timeout=min(1.0, deadline - time.monotonic()))
            return not self.queue

    def close(self, flush_s: float = 30.0) -> list[dict[str, Any]]:
        """Flush within ``flush_s``, stop the thread; the metrics still unsent, as rows
        ``{key, value, timestamp, step}``. A server that did not answer the last request
        gets one more (``timeout_s``), not the whole ``flush_s``: the run's end waits for
        nothing the run folder cannot keep."""
        if self.failing:
            flush_s = min(flush_s, self.timeout_s + 1.0)
        self.flush(flush_s)
        with self.lock:
            self.closing = True
            self.lock.notify_all()
        self.thread.join(timeout=self.timeout_s + 1)
        with self.lock:
            left, self.queue = self.queue, []
        return [
            {"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in left
        ]


def spill(rows: list[dict[str, Any]], run_dir: str, storage: StorageConfig | None) -> str:
    """Append unsent metric rows to the run folder's ``mlflow_pending.jsonl``; its URI."""
    from infra.storage import filesystem, join

    uri = join(run_dir, PENDING_METRICS)
    fs, path = filesystem(uri, storage)
    old = fs.cat_file(path).decode() if fs.exists(path) else ""
    with fs.open(path, "w") as handle:
        handle.write(old + "".join(json.dumps(row) + "\n" for row in rows))
    return uri


def replay_pending(run_dir: str, storage: StorageConfig | None, uri: str, run_id: str) -> int:
    """Log the run folder's pending metrics to MLflow run ``run_id`` (the steps it has
    already are skipped, per key), then remove the file; how many were sent."""
    from mlflow.entities import Metric

    from infra.storage import filesystem, join

    fs, path = filesystem(join(run_dir, PENDING_METRICS), storage)
    if not fs.exists(path):
        return 0
    rows = [json.loads(line) for line in fs.cat_file(path).decode().splitlines() if line]
    tracker = Tracker(uri, run_id)
    logged: dict[str, set[int]] = {}
    items = []
    for row in rows:
        if row["key"] not in logged:
            history = tracker.client.get_metric_history(run_id, row["key"])
            logged[row["key"]] = {m.step for m in history}
        if row["step"] not in logged[row["key"]]:
            items.append(Metric(row["key"], row["value"], row["timestamp"], row["step"]))
            logged[row["key"]].add(row["step"])
    for start in range(0, len(items), _METRIC_BATCH):
        tracker.client.log_batch(run_id, metrics=items[start : start + _METRIC_BATCH])
    fs.rm(path)
    return len(items)


def is_server(uri: str) -> bool:
    """Whether ``uri`` names a tracking server (every machine sees the same store), not a
    file or database path (which is the store of the machine that opens it)."""
    return uri.startswith(("http://", "https://", "databricks"))


@contextlib.contextmanager
def fail_fast(timeout_s: int | None = None, retries: int = 0) -> Iterator[None]:
    """MLflow requests of an interactive command: ``1 + retries`` attempts each (a retry
    only after an answer such as 503, with MLflow's backoff), ``timeout_s`` each at most
    (``infra.timeouts.network_timeout_s()`` unless given). MLflow's own default retries
    back off for minutes against a server that is down."""
    if timeout_s is None:
        timeout_s = max(1, round(network_timeout_s()))
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
    }
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def store_exists(uri: str) -> bool:
    """False for a sqlite store whose file is gone (opening it would create an empty one)."""
    if uri.startswith("sqlite:///"):
        return os.path.exists(uri.removeprefix("sqlite:///"))
    return True


def check_store(uri: str) -> None:
    """Raise a one-line ServiceError unless the tracking server at ``uri`` answers now. A
    file or database store is not opened here: opening it creates it, and a command that
    then stops on another mistake would leave that behind."""
    if not is_server(uri):
        return
    from mlflow.tracking import MlflowClient

    with fail_fast():
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as exc:  # MLflow, requests and SQLAlchemy each raise their own
            if "timed out" in str(exc) or "Timeout" in str(exc):
                why = f"did not answer within {network_timeout_s():g} s"
            else:
                why = f"does not answer ({first_line(exc)})"
            raise ServiceError(
                f"tracking.uri {uri}: the MLflow server {why}; start it or fix tracking.uri"
                f" ({NETWORK_TIMEOUT_ENV} sets the wait)"
            ) from None


def run_id_in(run_dir: str, storage: StorageConfig | None) -> str | None:
    """The MLflow run id kept in a run folder, or ``None`` while it has none."""
    fs, path = filesystem(join(run_dir, MLFLOW_RUN_FILE), storage)
    try:
        with fs.open(path, "r") as handle:
            return json.load(handle)["run_id"]
    except FileNotFoundError:
        return None


def open_run(run: RunConfig, run_dir: str, name: str, tags: Mapping[str, str]) -> Tracker:
    """The MLflow run of the run folder ``run_dir``: continued (status RUNNING, ``tags``
    added) when the folder names one, else created - with the resolved config as params,
    linked to the run it starts from - and its id written into the folder."""
    run_id = run_id_in(run_dir, run.storage)
    if run_id:
        tracker = Tracker(run.tracking.uri, run_id)
        tracker.reopen()
        tracker.set_tags(tags)
        return tracker
    parent = _parent_run_id(run)
    if parent:
        tags = {**tags, **lineage_tags(run, parent)}
    tracker = Tracker.create(run, name, tags)
    fs, path = filesystem(join(run_dir, MLFLOW_RUN_FILE), run.storage)
    with fs.open(path, "w") as handle:
        json.dump({"run_id": tracker.run_id}, handle)
    return tracker


def end_run(run: RunConfig, run_dir: str, status: str = "FAILED") -> None:
    """End the run folder's MLflow run as ``status`` (FAILED, KILLED), if it has one: a job
    stopped or failed before its end, or a submission Ray refused, leaves no run RUNNING.
    Best effort: what happened to the job is what the user needs to see, so a store that
    does not answer is only logged."""
    try:
        run_id = run_id_in(run_dir, run.storage)
        if run_id:
            with fail_fast():
                Tracker(run.tracking.uri, run_id).finish(status)
    except Exception as exc:  # MLflow, requests, SQLAlchemy and fsspec each raise their own
        log.warning("could not mark the MLflow run of %s %s: %s", run_dir, status, first_line(exc))


#: The tag naming the MLflow run whose checkpoint a run starts from (SFT from pretrain).
#: Not ``mlflow.parentRunId``: MLflow's UI folds a child under its parent in the runs
#: table, where an SFT run must stand as a run of its own.
STARTED_FROM = "m2d.started_from"


def lineage_tags(run: RunConfig, parent: str) -> dict[str, str]:
    """The tags that link a run to ``parent``: its id, and a note (shown on the run's page)
    with a link to it."""
    from mlflow.tracking import MlflowClient

    found = MlflowClient(tracking_uri=run.tracking.uri).get_run(parent)
    link = f"#/experiments/{found.info.experiment_id}/runs/{parent}"
    note = f"Started from [{found.info.run_name}]({link}), checkpoint `{run.init_from}`."
    return {STARTED_FROM: parent, "mlflow.note.content": note}


def _parent_run_id(run: RunConfig) -> str | None:
    """The MLflow run of the checkpoint this run starts from (``init_from``), if it is in
    this run's tracking store; read from the checkpoint's ``trainer_state.json``."""
    if not run.init_from:
        return None
    try:
        parent = read_trainer_state(run.init_from.rstrip("/"), run.storage).mlflow_run_id
    except DataError as exc:
        log.warning("no parent MLflow run: %s", exc)
        return None
    if not parent:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=run.tracking.uri).get_run(parent)
    except MlflowException:
        log.warning("parent MLflow run %s is not in %s; not linking", parent, run.tracking.uri)
        return None
    return parent


#: MLflow's experiment type, read by its UI: an experiment of this kind opens on its
#: training runs, not on the GenAI traces view (MLflow 3).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def _experiment_id(client, tracking: TrackingConfig) -> str:
    """The experiment's id, creating it (as one of model training, ``EXPERIMENT_KIND``)
    if missing; one m2d made before, or a user's that says no kind, gets the kind too. Two
    jobs starting at once may both find it missing: the one whose create loses the race
    reads the other's."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        if EXPERIMENT_KIND[0] not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
        return experiment.experiment_id
    try:
        return client.create_experiment(
            tracking.experiment,
            artifact_location=_artifact_location(tracking.uri),
            tags=dict([EXPERIMENT_KIND]),
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(tracking.experiment).experiment_id


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside the database (MLflow's default is ./mlruns in
    whatever folder the job happens to start in); a server decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    database = uri.removeprefix("sqlite:///")
    return os.path.join(os.path.dirname(os.path.abspath(database)), "mlartifacts")
