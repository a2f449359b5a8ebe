"""Starting the training job: a child process here (`local`) or a Ray job (remote).

Both run the same entry point, ``python -m trainer.job --spec TRAIN_JOB_SPEC`` (the run
folder's ``run_config.json`` is all it reads); the orchestrator never imports the trainer.
Credentials are never put in the job's runtime environment (Ray shows it in the dashboard
and logs): a local child inherits this process's environment, remote workers read their
own.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from infra.config import RunConfig
from infra.errors import ConfigError
from infra.job_entry import EXIT_FAILURE, EXIT_INTERRUPTED, spec_argv
from infra.job_specs import TrainJobSpec
from infra.processes import process_start
from orchestrator import ray_jobs
from orchestrator.console import JobConsole
from orchestrator.runs import RunRecord, job_alive, load_record, registry_dir

JOB_MODULE = "trainer.job"


def job_command(record: RunRecord, python: str = "python") -> list[str]:
    """The job entry point's command line (the storage settings let it read an S3 config)."""
    spec = TrainJobSpec(config=record.config_uri, storage=record.storage_config)
    return [python, "-m", JOB_MODULE, *spec_argv(spec)]


def run_local(record: RunRecord, verbose: bool = False) -> int:
    """Run the job in the foreground: all its output goes to the run's log file, m2d's
    lines and its progress to the console (``orchestrator.console``)."""
    record.log_path = str(registry_dir() / f"{record.name}.log")
    console = JobConsole(record.log_path, verbose=verbose)
    console.say(f"log: {record.log_path}")
    process = subprocess.Popen(
        job_command(record, python=sys.executable),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        start_new_session=True,  # `m2d stop` ends the whole group, Ray workers included
    )
    record.pid, record.exit_code, record.stopped = process.pid, None, False
    record.pid_start = process_start(process.pid)
    record.save()
    interrupted = False
    try:
        record.exit_code = console.relay(process)
    except KeyboardInterrupt:
        # Ctrl-C: the job (its own session) is stopped and waited for - its workers may
        # still write a checkpoint - before the record says STOPPED.
        interrupted = True
        console.say(f"stopping {record.name}: waiting for its job to end")
        os.killpg(process.pid, signal.SIGTERM)
        record.exit_code = process.wait()
    finally:
        console.close()
    if record.exit_code == EXIT_FAILURE and not interrupted:
        console.say(f"the job failed; its traceback is in {record.log_path}")
    # `m2d stop` from another shell marked the record meanwhile: keep its mark.
    record.stopped = interrupted or record.stopped or load_record(record.name).stopped
    record.save()
    return EXIT_INTERRUPTED if interrupted else record.exit_code


def stop_local(record: RunRecord) -> bool:
    """Send SIGTERM to a local run's process group, marking the record stopped; False if
    it was not running."""
    if not job_alive(record):  # gone, or its pid now names another process
        return False
    record.stopped = True
    record.save()
    os.killpg(record.pid, signal.SIGTERM)
    return True


# The packages a job imports, shipped as Ray py_modules; what never goes with them.
SHIPPED_PACKAGES = (
    "infra",
    "mask2dit",
    "trainer",
    "datajobs",
    "sampler",
    "evaluation",
    "orchestrator",
)
SHIP_EXCLUDES = ["__pycache__", "*.pyc", "runs/", "data/", ".venv/", "*.egg-info/"]


def shipped_code() -> list[str]:
    """This checkout's package folders (the ones this process imported m2d from)."""
    import importlib.util

    folders = []
    for package in SHIPPED_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"cannot find the {package} package to ship with the job")
        folders.append(str(Path(next(iter(spec.submodule_search_locations))).resolve()))
    return folders


def shipped_bytes(folder: str) -> int:
    """Bytes of ``folder`` that go with a job: what ``SHIP_EXCLUDES`` leaves."""
    patterns = [pattern.rstrip("/") for pattern in SHIP_EXCLUDES]
    return sum(
        path.stat().st_size
        for path in Path(folder).rglob("*")
        if path.is_file()
        and not any(fnmatch(part, p) for part in path.relative_to(folder).parts for p in patterns)
    )


def runtime_env(run: RunConfig) -> dict[str, Any]:
    """The Ray runtime_env of a remote job: this checkout's code (unless
    ``runtime_env.ship_code`` is off), image, pip and non-secret env vars - no secrets."""
    env: dict[str, Any] = {}
    env_vars = dict(run.runtime_env.env_vars)
    if run.storage.credentials_file:
        # Every process of the job opens storage, Ray Train's controller too: the file's
        # path (never its keys) goes to all of them, as storage_options sets it here.
        env_vars.setdefault("AWS_SHARED_CREDENTIALS_FILE", run.storage.credentials_file)
    if run.runtime_env.ship_code:
        from orchestrator.provenance import git_state

        env["py_modules"] = shipped_code()
        env["excludes"] = list(SHIP_EXCLUDES)
        # The shipped copy has no .git: the job tags its MLflow run with this commit.
        env_vars.setdefault("M2D_GIT_COMMIT", git_state()[0])
        # `python -m` would put the job's working directory first on sys.path, ahead of
        # the shipped packages: a copy of m2d there (the head's own checkout) would win.
        env_vars.setdefault("PYTHONSAFEPATH", "1")
    if env_vars:
        env["env_vars"] = env_vars
    if run.runtime_env.pip:
        env["pip"] = list(run.runtime_env.pip)
    if run.runtime_env.image:
        env["image_uri"] = run.runtime_env.image
    return env


def submit_remote(record: RunRecord, run: RunConfig, submission_id: str | None = None) -> None:
    """Submit the job to a remote Ray cluster through the Jobs API; returns at once.

    The Ray job is named after the run unless ``submission_id`` says otherwise (Ray keeps
    job names unique, so a second job on the same run folder needs its own); the record
    keeps the name, so status, logs and stop follow the latest job.
    """
    client = ray_jobs.job_client(run.ray.address)
    record.job_id = submission_id or record.name
    ray_jobs.submit_job(
        client,
        f"the job {record.name}",
        entrypoint=shlex.join(job_command(record)),
        submission_id=record.job_id,
        runtime_env=runtime_env(run),
        metadata={"m2d_run": record.name, "cluster": run.cluster, "stage": run.stage},
    )
    record.save()


def run_job_on(
    run: RunConfig,
    module: str,
    spec: BaseModel,
    what: str,
    then: tuple[tuple[str, BaseModel], ...] = (),
) -> None:
    """``python -m MODULE --spec SPEC`` here in the foreground (a failure exits with the
    job's status) when ``run``'s Ray is local, else submitted to its Ray cluster with the
    shipped code (``what`` names the job in Ray's metadata and in the lines printed).
    ``then``: (module, spec) jobs that follow it once it succeeded (on the cluster: in the
    same Ray job)."""
    import click

    from orchestrator import jobs

    steps = ((module, spec), *then)
    if run.ray.address == "local":
        for step_module, step_spec in steps:
            jobs.run_here(step_module, step_spec)
        return
    commands = [shlex.join(["python", "-m", m, *spec_argv(s)]) for m, s in steps]
    job_id = ray_jobs.submit_job(
        ray_jobs.job_client(run.ray.address),
        f"the {what} job",
        echo=click.echo,
        entrypoint=" && ".join(commands),
        runtime_env=runtime_env(run),
        metadata={"m2d": what, "cluster": run.cluster},
    )
    click.echo(f"submitted {what} job {job_id} to {run.ray.address}")
    click.echo(f"follow with: ray job logs --follow --address {run.ray.address} {job_id}")


def follow_remote_logs(record: RunRecord, echo: Callable[[str], None] | None = None) -> int:
    """Stream a remote run's job log until the job ends (``m2d launch --follow``, ``m2d
    logs -f``); 0 if it succeeded."""
    import asyncio

    import click

    from orchestrator.runs import state_of

    echo = echo or (lambda chunk: click.echo(chunk, nl=False))

    async def stream() -> None:
        client = ray_jobs.job_client(record.address)
        async for chunk in client.tail_job_logs(record.ray_job):
            echo(chunk)

    asyncio.run(stream())
    return 0 if state_of(record) == "SUCCEEDED" else 1
