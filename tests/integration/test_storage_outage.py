"""The object store goes down during training (a proxy in front of the S3 API server drops
every request from the first upload of a chosen checkpoint on).

A short outage: the ranks' uploads retry, the checkpoint lands once the store answers and
the run goes on. A long one (past `fault_tolerance.storage_retry_s`): the run stops with
one line, the checkpoint it was saving is never chosen, and once the store is back
`--resume` continues from the last complete one and finishes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from m2d_cli import M2D, local_env, register_run
from s3_proxy import CountingProxy

from infra.config import ClusterProfile, RunConfig, resolve_run
from infra.job_entry import spec_argv
from infra.job_specs import TrainJobSpec

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EVERY, STEPS = 3, 9
BUDGET_S = 15  # storage_retry_s of the run


def _checkpoint(step: int) -> str:
    return f"checkpoint_{step:08d}"


def _run(root: str, endpoint: str, tracking: str) -> RunConfig:
    profile = ClusterProfile.model_validate(
        yaml.safe_load((ROOT / "clusters/local.yaml").read_text())
    )
    return resolve_run(
        profile,
        "local",
        "pretrain",
        {
            "recipe": {"steps": STEPS, "warmup_steps": 1},
            "fault_tolerance": {
                "checkpoint_every": EVERY,
                "max_failures": 1,
                "keep_checkpoints": 3,
                "storage_retry_s": BUDGET_S,
            },
            "storage": {"root": root, "endpoint_url": endpoint},
            "tracking": {"uri": tracking, "experiment": "m2d-storage-outage"},
            "data": {"synthetic": True},
        },
    )


def _wait(condition, what: str, job: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert job.poll() is None, f"the job ended before {what}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.2)


def test_a_short_outage_delays_a_checkpoint_a_long_one_stops_the_run_and_resume_continues(
    s3_endpoint, mlflow_server, tmp_path
):
    import boto3
    import s3fs

    from orchestrator.runs import latest_checkpoint

    bucket = f"m2d-outage-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    run_dir = f"s3://{bucket}/runs/outage"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})

    def complete(step: int) -> bool:
        fs.invalidate_cache()
        return fs.exists(f"{bucket}/runs/outage/{_checkpoint(step)}/manifest.json")

    def after_the_second(key: str) -> bool:
        """A long outage from the last checkpoint's first upload, once the second has its
        manifest (that upload's request waits here for it)."""
        if f"/{_checkpoint(STEPS)}/" not in key:
            return False
        deadline = time.monotonic() + 120
        while not complete(2 * EVERY) and time.monotonic() < deadline:
            time.sleep(0.1)
        return True

    # PYTHONUNBUFFERED: the job's log file shows the retries as they happen
    env = local_env(PYTHONUNBUFFERED="1")
    log = tmp_path / "job.log"
    with CountingProxy(s3_endpoint) as proxy:
        run = _run(f"s3://{bucket}/runs", proxy.url, mlflow_server)
        fs.pipe(f"{bucket}/runs/outage/run_config.json", run.model_dump_json().encode())
        spec = TrainJobSpec(config=f"{run_dir}/run_config.json", storage=run.storage)
        proxy.trips = lambda key: f"/{_checkpoint(2 * EVERY)}/" in key
        with log.open("w") as out:
            job = subprocess.Popen(
                [sys.executable, "-m", "trainer.job", *spec_argv(spec)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            # A short outage: the upload of the second checkpoint is retried by m2d (after
            # botocore's own retries), and lands once the store answers again.
            _wait(lambda: "; retrying for up to" in log.read_text(), "retry", job, log)
            assert not complete(2 * EVERY)
            proxy.trips = after_the_second  # the long one, next
            proxy.down = False
            _wait(lambda: complete(2 * EVERY), "late second checkpoint", job, log)
            assert any(_checkpoint(2 * EVERY) in key for key in proxy.refused)
            job.wait(timeout=300)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
        output = log.read_text()
        assert job.returncode == 2, output[-3000:]
        assert proxy.down and any(_checkpoint(STEPS) in key for key in proxy.refused)
        last = output.strip().splitlines()[-1]
        # One line: which operation on which storage gave up after the budget, and the fix
        # (a worker's upload or read, or the controller's own write: whichever came first).
        assert last.startswith("error: StorageError: ") and len(output.strip()) > len(last)
        assert f" on s3://{bucket}/runs failed for {BUDGET_S} s (" in last, last
        assert "`m2d launch --resume RUN` continues" in last, last

    assert not complete(STEPS)  # never chosen: no manifest
    storage = {"root": f"s3://{bucket}/runs", "endpoint_url": s3_endpoint}
    record = register_run("outage", run_dir, storage=storage)
    assert latest_checkpoint(record, lambda warning: None) == f"{run_dir}/{_checkpoint(2 * EVERY)}"

    # The store is back (straight to the S3 server now): the run resumes and finishes.
    direct = run.model_copy(
        update={"storage": run.storage.model_copy(update={"endpoint_url": s3_endpoint})}
    )
    fs.pipe(f"{bucket}/runs/outage/run_config.json", direct.model_dump_json().encode())
    spec = TrainJobSpec(config=f"{run_dir}/run_config.json", storage=direct.storage)
    done = subprocess.run(
        [sys.executable, "-m", "trainer.job", *spec_argv(spec)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"rank 0 resumed at step {2 * EVERY}" in done.stdout + done.stderr
    assert complete(STEPS)
    listed = subprocess.run(
        [*M2D, "checkpoints", "outage"], cwd=ROOT, capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[:2] for line in listed.stdout.splitlines()[1:]] == [
        [_checkpoint(step), "complete"] for step in (EVERY, 2 * EVERY, STEPS)
    ], listed.stdout
