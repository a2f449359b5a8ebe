"""Secrets planted in every credential variable appear nowhere m2d writes or sends.

A real local launch (S3 API server for storage, a real `mlflow server`), its dry-run and
plan, and a remote launch through a Ray head's Jobs API, all with the planted values in
their environment; then every log line, MLflow param/tag/artifact, file in the run
folder and the Ray job's entrypoint, runtime environment and metadata is searched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from m2d_cli import local_env
from ray_session import wait_job

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
M2D = [sys.executable, "-c", "from orchestrator.cli import main; main()"]
MODEL = ["--set", f"model.source={ROOT / 'orchestrator/plan/model_configs/CogVideoX-5b'}"]
PLANTED = {
    "AWS_ACCESS_KEY_ID": "AKIAPLANTED0001",
    "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-0002",
    "AWS_SESSION_TOKEN": "planted-aws-session-0003",
    "MLFLOW_TRACKING_TOKEN": "planted-mlflow-token-0004",
    "MLFLOW_TRACKING_USERNAME": "planted-mlflow-user-0005",
    "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-password-0006",
    "M2D_EXTRA_API_KEY": "planted-extra-0007",
}


def _leaks(text: str) -> list[str]:
    return [name for name, value in PLANTED.items() if value in text]


def _m2d(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*M2D, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_planted_secrets_appear_in_no_output_record_or_submission(
    tmp_path, s3_endpoint, s3_bucket, mlflow_server, ray_head
):
    import s3fs
    from mlflow.tracking import MlflowClient

    env = local_env(**PLANTED, M2D_HOME=str(tmp_path / "home"))
    sets = {
        "storage.root": f"s3://{s3_bucket}/runs",
        "storage.endpoint_url": s3_endpoint,
        "tracking.uri": mlflow_server,
        "tracking.experiment": "m2d-secrets",
        "data.synthetic": "true",
        "recipe.steps": "2",
        "recipe.warmup_steps": "1",
        "fault_tolerance.checkpoint_every": "1",
    }
    flags = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    launch = ["launch", "--cluster", "local", "--stage", "pretrain", *flags]
    outputs = {
        "dry-run": _m2d(env, *launch, "--dry-run"),
        "plan": _m2d(env, "plan", "--cluster", "a100x64", "--stage", "pretrain", "--json", *MODEL),
        "launch": _m2d(env, *launch, "--name", "planted"),
    }
    for what, done in outputs.items():
        assert done.returncode == 0, (what, done.stdout[-2000:], done.stderr[-2000:])
        assert not _leaks(done.stdout + done.stderr), what
    assert "AWS_SECRET_ACCESS_KEY: set" in outputs["dry-run"].stdout  # named, not shown

    logs = [*(tmp_path / "home").rglob("*.log"), *(tmp_path / "home").rglob("*.json")]
    assert logs
    for path in logs:
        assert not _leaks(path.read_text(errors="replace")), path

    # Everything in the run folder on storage: configs, checkpoints' JSON, the weights'
    # metadata (binary files are searched as bytes).
    fs = s3fs.S3FileSystem(
        key=PLANTED["AWS_ACCESS_KEY_ID"],
        secret=PLANTED["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"endpoint_url": s3_endpoint},
    )
    files = fs.find(f"{s3_bucket}/runs/planted")
    assert any(f.endswith("manifest.json") for f in files)
    for key in files:
        data = fs.cat_file(key)
        assert not [n for n, v in PLANTED.items() if v.encode() in data], key

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("m2d-secrets")
    (run,) = client.search_runs([experiment.experiment_id])
    assert not _leaks(json.dumps(run.data.params)) and not _leaks(json.dumps(run.data.tags))
    for artifact in _artifacts(client, run.info.run_id):
        local = client.download_artifacts(run.info.run_id, artifact, str(tmp_path / "dl"))
        assert not _leaks(Path(local).read_text(errors="replace")), artifact

    # A remote launch: what goes to Ray (entrypoint, runtime env, metadata) and the job's log.
    from ray.job_submission import JobSubmissionClient

    remote = [f"--set=ray.address={ray_head}", f"--set=storage.root={tmp_path / 'remote'}"]
    auth = {k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH_")}
    submitted = _m2d({**env, **auth}, *launch, *remote, "--name", "planted-remote")
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    assert not _leaks(submitted.stdout + submitted.stderr)
    client = JobSubmissionClient(ray_head)
    assert wait_job(ray_head, "planted-remote", timeout=400) == "SUCCEEDED"
    info = client.get_job_info("planted-remote")
    sent = json.dumps([info.entrypoint, info.runtime_env, info.metadata])
    assert "planted-remote" in sent and not _leaks(sent), sent
    assert not _leaks(client.get_job_logs("planted-remote"))


def _artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found
