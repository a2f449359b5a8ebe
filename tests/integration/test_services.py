"""The service fixtures themselves: real servers answer, and storage reaches S3."""

from __future__ import annotations

import pytest

from infra.config import StorageConfig
from infra.storage import filesystem, join

pytestmark = pytest.mark.integration


def test_s3_roundtrip_through_fsspec(s3_endpoint, s3_bucket):
    storage = StorageConfig(root=f"s3://{s3_bucket}/runs", endpoint_url=s3_endpoint)
    fs, path = filesystem(join(storage.root, "hello.txt"), storage)
    with fs.open(path, "wb") as handle:
        handle.write(b"hi")
    fs2, path2 = filesystem(f"s3://{s3_bucket}/runs", storage)
    assert fs2.ls(path2) == [f"{s3_bucket}/runs/hello.txt"]
    assert fs2.cat(f"{path2}/hello.txt") == b"hi"


def test_mlflow_server_records_a_run(mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.create_experiment("fixture-check")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "loss", 0.5, step=1)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5)]


def test_ray_head_runs_jobs_and_requires_the_token(ray_head):
    import urllib.error
    import urllib.request

    from ray.job_submission import JobSubmissionClient
    from ray_session import wait_job

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ray_head}/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)
    client = JobSubmissionClient(ray_head)
    job = client.submit_job(entrypoint="echo fixture-ok")
    assert wait_job(ray_head, job, timeout=60) == "SUCCEEDED"
    assert "fixture-ok" in client.get_job_logs(job)
