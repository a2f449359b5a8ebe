"""``m2d launch ...`` (``python -m trainer.job --spec TRAIN_JOB_SPEC``): the training job,
one run folder in, a fitted Ray Train run out.

The spec names ``{storage.root}/{run_name}/run_config.json`` (a path or ``s3://``), which
the orchestrator wrote and which is the whole truth of the run: its data, its
``init_from``, everything the workers use. The run's name is that folder's name and Ray
Train keeps its state and checkpoints in the same folder. Run it locally as a subprocess
or as a Ray Jobs entrypoint: ``ray.init()`` joins the cluster named by ``RAY_ADDRESS`` or
starts a local Ray. The job continues the MLflow run named in ``mlflow_run.json`` beside
the config (the launcher opens it where it can reach the store) or opens it
(``infra.tracking.open_run``); running it again on the same folder resumes from the latest
checkpoint, in that same MLflow run. A run that starts from another run's checkpoint
(``init_from``: SFT from pretrain) names that run's MLflow run (``m2d.started_from``, and a
note linking to it); every reported
checkpoint is logged there as a small JSON artifact (``checkpoints/checkpoint_NNNNNNNN.json``:
URI, step, time) and the ``checkpoint.latest`` tag.

Exit status: 0 finished, 1 training failed, 2 a problem the user can fix (bad config,
missing data or storage); the last line printed says which.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from infra.checkpoint_layout import write_manifest
from infra.config import RunConfig, StorageConfig
from infra.errors import ConfigError, DataError, M2DError, ServiceError, StorageError, first_line
from infra.job_entry import job_main
from infra.job_specs import TrainJobSpec
from infra.logging import get_logger, progress
from infra.notify import Notifier
from infra.ray_runtime import init_ray
from infra.run_folder import read_provenance, read_run_config
from infra.storage import (
    bounded,
    check_stage_input,
    filesystem,
    is_remote,
    join,
    retry_storage,
    storage_options,
)
from infra.tracking import Tracker, end_run, fail_fast, loss_trend, open_run

__all__ = [
    "RunFolder",
    "main",
    "ray_run_config",
    "read_run_folder",
    "scaling_config",
    "train_worker",
    "worker_config",
]

log = get_logger("trainer.job")

# Ray Train's record of a run's reported checkpoints, in the run folder
# (ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass
class RunFolder:
    """The run's folder on storage: its URI, name, parent (Ray's storage path) and config."""

    uri: str
    name: str
    parent: str
    run: RunConfig


def read_run_folder(config_uri: str, storage: StorageConfig | None = None) -> RunFolder:
    """Read and validate ``run_config.json``, reached with ``storage``'s settings; the run
    is named after its folder."""
    folder = config_uri.rstrip("/").rsplit("/", 1)[0]
    run = read_run_config(folder, storage, fix="give the run_config.json the launcher wrote")
    parent, name = folder.rsplit("/", 1) if "/" in folder else (".", folder)
    if not is_remote(parent):
        parent = os.path.abspath(parent.removeprefix("file://"))
    return RunFolder(uri=folder, name=name, parent=parent, run=run)


def scaling_config(run: RunConfig) -> Any:
    """Ray Train workers from the profile's ``workers`` section."""
    from ray.train import ScalingConfig

    workers = run.workers
    return ScalingConfig(
        num_workers=workers.num_workers,
        use_gpu=workers.gpus_per_worker > 0,
        resources_per_worker=workers.resources_per_worker,
        accelerator_type=workers.gpu_type,
        placement_strategy=workers.placement,
    )


def ray_run_config(folder: RunFolder, callbacks: list[Any] | None = None) -> Any:
    """Ray Train's RunConfig: the run's folder as storage, restarts and checkpoint retention."""
    import ray.train

    ft = folder.run.fault_tolerance
    storage_path, storage_fs = _ray_storage(folder.parent, folder.run)
    return ray.train.RunConfig(
        name=folder.name,
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        failure_config=ray.train.FailureConfig(max_failures=ft.max_failures),
        # Two at least, whatever keep_checkpoints says: the newer may turn out torn.
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(2, ft.keep_checkpoints)),
        callbacks=callbacks or [],
    )


def _ray_storage(parent: str, run: RunConfig) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None): s3:// goes through s3fs for endpoint and
    region, every operation retried while the store fails (``infra.arrow_storage``)."""
    if not is_remote(parent):
        return parent, None
    import pyarrow.fs
    import s3fs

    from infra.arrow_storage import RetryingHandler

    # One botocore attempt a request (infra.storage), s3fs' quick tries: the handler's
    # retries hold the budget.
    fs = bounded(s3fs.S3FileSystem(**storage_options(run.storage)))
    handler = RetryingHandler(fs, run.fault_tolerance.storage_retry_s, run.storage.root)
    return parent.split("://", 1)[1], pyarrow.fs.PyFileSystem(handler)


def set_aside_torn_snapshot(folder: RunFolder) -> str | None:
    """Move Ray Train's run snapshot aside when Ray could not start on it: cut short (Ray
    rewrites it in place after every checkpoint, and a full disk leaves it empty), not
    JSON, or naming a checkpoint folder that is gone. Ray would refuse the resume
    (``CheckpointManagerInitializationError``) even with space back; without the snapshot
    the workers resume from the run's newest complete checkpoint, which m2d finds from the
    manifests itself (``trainer.loop``). The snapshot is renamed, never deleted; the new
    name, or None when it was sound (or absent)."""
    fs, path = filesystem(join(folder.uri, RAY_SNAPSHOT), folder.run.storage)
    try:
        text = fs.cat_file(path)
    except FileNotFoundError:
        return None
    problem = _snapshot_problem(text, lambda name: fs.exists(f"{path.rsplit('/', 1)[0]}/{name}"))
    if problem is None:
        return None
    aside = f"{path}.torn-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    fs.mv(path, aside)
    log.warning(
        "Ray Train's run snapshot %s %s: set aside as %s; the run resumes from its newest "
        "complete checkpoint",
        join(folder.uri, RAY_SNAPSHOT),
        problem,
        aside.rsplit("/", 1)[-1],
    )
    return aside


def _snapshot_problem(text: bytes, exists) -> str | None:
    """Why Ray Train would not start on this snapshot (None: it would)."""
    if not text.strip():
        return "is empty (cut short while written)"
    try:
        names = [r["checkpoint_dir_name"] for r in json.loads(text)["checkpoint_results"]]
    except (ValueError, KeyError, TypeError):
        return "is not the JSON Ray wrote (cut short while written?)"
    gone = [name for name in names if not exists(name)]
    if gone:
        return f"names checkpoint folders that are gone ({', '.join(gone)})"
    return None


def provenance_tags(folder: RunFolder) -> dict[str, str]:
    """MLflow tags from the run's provenance.json (none for a run launched before it)."""
    try:
        found = read_provenance(folder.uri, folder.run.storage)
    except DataError as exc:
        log.warning("%s", exc)
        return {}
    if found is None:
        return {}
    return {
        "git_commit": found.git_commit,
        "m2d.git_dirty": str(found.git_dirty).lower(),
        "m2d.packages": json.dumps(found.packages, sort_keys=True),
        "m2d.profile_sha256": found.profile_sha256 or "unknown",
        "m2d.manifests": json.dumps(found.manifests, sort_keys=True),
    }


def git_commit() -> str:
    """The commit of the code that runs (``M2D_GIT_COMMIT`` wins; 'unknown' outside git)."""
    if os.environ.get("M2D_GIT_COMMIT"):
        return os.environ["M2D_GIT_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _progress_callback(folder: RunFolder, tracker: Tracker, notifier: Notifier) -> Any:
    """A controller-side callback: a progress record per report (``infra.logging.progress``,
    which the CLI's console displays), checkpoints into MLflow and the webhook, a worker
    failure Ray restarts from to the webhook."""
    from ray.train import UserCallback

    allowed = folder.run.fault_tolerance.max_failures

    class Progress(UserCallback):
        failures = 0

        def after_exception(self, run_context: Any, worker_exceptions: dict) -> None:
            self.failures += 1
            if allowed == -1 or self.failures <= allowed:  # Ray starts the workers again
                error = next(iter(worker_exceptions.values()), None)
                why = _first_line(error) if error is not None else ""
                notifier.post("restarted", restarts=self.failures, error=why)

        def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
            rank0 = metrics[0] if metrics else {}
            step = int(rank0.get("step", 0))
            progress(
                step=step,
                loss=round(float(rank0.get("loss", float("nan"))), 6),
                samples_per_s=round(float(rank0.get("samples_per_s", 0.0)), 3),
                checkpoint=checkpoint is not None,
            )
            if checkpoint is not None:
                name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
                uri = f"{folder.parent}/{folder.name}/{name}"
                _commit(uri, folder.run)
                notifier.post("checkpoint", step=step, checkpoint=uri)
                try:  # a tracking server that does not answer must not hold up training
                    with fail_fast(10):
                        tracker.log_checkpoint(uri, step)
                except Exception as exc:  # MlflowException, requests' errors...
                    log.warning("MLflow did not record checkpoint %s (%s)", uri, exc)

    return Progress()


def _commit(uri: str, run: RunConfig) -> None:
    """Write checkpoint ``uri``'s manifest - every rank's files are on storage once Ray
    reports it - which makes it count; a checkpoint that cannot get one is left without
    (its readers take the one before), saying why. A storage that fails is retried as a
    rank's upload is (``fault_tolerance.storage_retry_s``); an error here never ends the
    run, whose controller this runs in."""
    try:
        problem = retry_storage(
            lambda: write_manifest(uri, run.storage, run.workers.num_workers),
            f"the manifest of {uri}",
            run.fault_tolerance.storage_retry_s,
            "the checkpoint stays without one",
        )
    except (StorageError, OSError, ValueError) as exc:
        problem = first_line(exc)
    if problem:
        log.warning("checkpoint %s has no manifest (%s): readers use the one before", uri, problem)


@dataclass
class Outcome:
    """How a fit ended: last metrics and checkpoint, or the error."""

    tracker: Tracker
    metrics: dict[str, Any]
    checkpoint: Any
    error: BaseException | None
    url: str = ""  # the MLflow run's, read at the start (the server may be gone by the end)


def fit(folder: RunFolder) -> Outcome:
    """Run (or resume) the run's TorchTrainer until it finishes or fails."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from trainer.process_group import torch_config

    init_ray()
    set_aside_torn_snapshot(folder)
    tags = {"git_commit": git_commit(), "ray_job_id": _ray_job_id(), **provenance_tags(folder)}
    tracker = _open_tracking(folder, tags)
    url = tracker.url
    log.info("MLflow run %s", url)
    notifier = Notifier(folder.run, folder.name, url)
    notifier.post("started")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=worker_config(folder, tracker.run_id),
        scaling_config=scaling_config(folder.run),
        torch_config=torch_config(folder.run),
        run_config=ray_run_config(folder, [_progress_callback(folder, tracker, notifier)]),
    )
    try:
        result = trainer.fit()
        outcome = Outcome(tracker, result.metrics or {}, result.checkpoint, result.error, url)
    except ray.train.TrainingFailedError as exc:  # V2 raises where V1 returned result.error
        outcome = Outcome(tracker, {}, None, exc, url)
    step = int(outcome.metrics.get("step", 0))
    if outcome.error:
        notifier.post("failed", step=step, error=_first_line(outcome.error))
    else:
        notifier.post("finished", step=step)
    try:  # one request, answered in milliseconds by a server that works
        with fail_fast(10):
            tracker.finish("FAILED" if outcome.error else "FINISHED")
    except Exception as exc:  # the run is done; only its MLflow status is not
        log.warning("MLflow did not record the run's end (%s)", exc)
    return outcome


def _open_tracking(folder: RunFolder, tags: dict[str, str]) -> Tracker:
    """The run's MLflow run, opened (or continued) with bounded waits: a request waits
    ``infra.timeouts`` at most and a server that answers with errors (a read-only store)
    is tried three times, not MLflow's default minutes of backoff; one line if it fails."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        with fail_fast(retries=2):
            return open_run(folder.run, folder.uri, folder.name, tags)
    except (MlflowException, requests.RequestException, OSError) as exc:
        raise ServiceError(
            f"tracking.uri {folder.run.tracking.uri}: the MLflow store did not take the run "
            f"({first_line(exc)}); fix the store (or tracking.uri), then "
            f"`m2d launch --resume {folder.name}`"
        ) from None


def worker_config(folder: RunFolder, mlflow_run_id: str | None) -> dict[str, Any]:
    """What every worker is given: the run folder's config, and the MLflow run to log to."""
    return {"run": folder.run.model_dump(mode="json"), "mlflow_run_id": mlflow_run_id}


def train_worker(config: dict[str, Any]) -> None:
    """Each worker's entry point: :func:`trainer.loop.train_loop_per_worker`, imported in
    the worker, so the driver never imports diffusers, transformers or DeepSpeed (5 s of
    every job's start on 2 cores)."""
    from trainer.loop import train_loop_per_worker

    train_loop_per_worker(config)


def _ray_job_id() -> str:
    import ray

    return os.environ.get("RAY_JOB_SUBMISSION_ID") or ray.get_runtime_context().get_job_id()


def check_input(run: RunConfig) -> None:
    """The stage's input (manifest or latents) must be set and exist, unless the run trains
    on synthetic data; checked before Ray starts, so a wrong path is one line, not every
    worker's traceback."""
    if run.data.synthetic:
        check_validation(run)
        return
    if run.data.stage_input(run.stage) is None:
        raise ConfigError(
            f"stage {run.stage} needs its manifest: set data.{run.stage} in the run config "
            f"(or data.{run.stage}_latents to precomputed latents, or data.synthetic: true "
            "for a run without files)"
        )
    check_stage_input(run.data, run.stage, run.storage)
    check_validation(run)


def check_validation(run: RunConfig) -> None:
    """A validation set that cannot be read or an encoder folder that is not one fails
    here, in one line, not in every worker after the model loads."""
    validation = run.recipe.validation
    if not validation.every:
        return
    from infra.prompts import prompt_file, read_stories

    if not read_stories(prompt_file(validation.prompts), run.storage):
        raise ConfigError(f"recipe.validation.prompts: {validation.prompts} holds no story")
    if validation.encoder:
        from evaluation.encoders import check_encoder

        check_encoder(validation.encoder, validation.encoder_path, run.storage)


def summary(folder: RunFolder, outcome: Outcome) -> str:
    """The one line printed at the end."""
    metrics = outcome.metrics
    checkpoint = outcome.checkpoint.path if outcome.checkpoint else "none"
    return (
        f"run {folder.name} {'failed' if outcome.error else 'finished'}: "
        f"step {int(metrics.get('step', 0))}/{folder.run.recipe.steps}, "
        f"loss {metrics.get('loss', float('nan')):.4f}, checkpoint {checkpoint}, "
        f"mlflow {outcome.url}"
    )


def _loss_trend(tracker: Tracker) -> str | None:
    """The run's loss trend from every step rank 0 logged (None if MLflow cannot say)."""
    try:
        with fail_fast(10):
            return loss_trend(tracker.metric_history("loss"))
    except Exception:  # the trend is a courtesy: a store that went away must not fail the run
        return None


def main(argv: list[str] | None = None) -> int:
    """The job entry point: a ``TrainJobSpec`` in, the run trained (or resumed)."""
    return job_main(TrainJobSpec, _main, argv)


def _main(spec: TrainJobSpec) -> int:
    folder, checked = None, False
    try:
        folder = read_run_folder(spec.config, spec.storage)
        check_input(folder.run)
        checked = True
        outcome = fit(folder)
    except M2DError as exc:
        if folder is None:
            raise
        end_run(folder.run, folder.uri, "FAILED")
        if checked:
            raise
        # Found before any step: the run folder and its record stay, and a resume once the
        # input is fixed starts it from step 0 under the same name.
        raise type(exc)(
            f"{exc}; once fixed, `m2d launch --resume {folder.name}` starts the run"
        ) from None
    except (KeyboardInterrupt, SystemExit):  # SIGTERM: `m2d stop`, Ray's job stop
        if folder is not None:  # the MLflow run says KILLED, not RUNNING, until a resume
            end_run(folder.run, folder.uri, "KILLED")
        raise
    import ray

    ray.shutdown()  # flushes the workers' streamed logs, so the summary comes last
    if trend := _loss_trend(outcome.tracker):
        print(trend, flush=True)
    print(summary(folder, outcome), flush=True)
    if outcome.error:
        print(f"error: {_first_line(outcome.error)}", file=sys.stderr)
        return 2 if isinstance(_root_cause(outcome.error), M2DError) else 1
    return 0


def _root_cause(error: BaseException) -> BaseException:
    """The worker's own exception inside Ray Train's wrappers, where one is attached."""
    seen = error
    for attr in ("worker_failures", "controller_failure", "_base_exc", "cause", "__cause__"):
        inner = getattr(seen, attr, None)
        if isinstance(inner, dict) and inner:
            inner = next(iter(inner.values()))
        if isinstance(inner, BaseException):
            seen = _root_cause(inner)
            break
    return seen


def _first_line(error: BaseException) -> str:
    root = _root_cause(error)
    text = str(root).strip().splitlines()
    return f"{type(root).__name__}: {text[-1] if text else ''}"


if __name__ == "__main__":
    sys.exit(main())
