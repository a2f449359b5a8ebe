"""Training runs the integration tests compare against, made once a session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from training_runs import ROOT, make_run, run_job

from infra.job_entry import spec_argv
from infra.job_specs import SynthSpec


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """Real mp4 stories and both manifests from the data package's generator."""
    out = tmp_path_factory.mktemp("data")
    spec = SynthSpec(out=str(out), stories=4, scenes=3, frames=17, height=32, width=32, seed=0)
    subprocess.run([sys.executable, "-m", "datajobs.synth", *spec_argv(spec)], check=True, cwd=ROOT)
    return out


@pytest.fixture(scope="session")
def s3_pretrain(s3_endpoint, mlflow_server, synth_data, tmp_path_factory):
    """A ZeRO-2 pretrain run of STEPS steps through `python -m trainer.job`, stored in S3."""
    import boto3
    import s3fs

    bucket = f"m2d-train-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    storage = {"root": f"s3://{bucket}/runs", "endpoint_url": s3_endpoint}
    run = make_run(storage, mlflow_server, data__pretrain=str(synth_data / "pretrain.jsonl"))
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.pipe(f"{bucket}/runs/pre-z2/run_config.json", run.model_dump_json().encode())
    done = run_job(f"s3://{bucket}/runs/pre-z2/run_config.json", endpoint_url=s3_endpoint)
    assert done.returncode == 0, done.stderr[-3000:]
    local = tmp_path_factory.mktemp("s3copy")
    fs.get(f"{bucket}/runs/pre-z2/", str(local), recursive=True)
    return {"stdout": done.stdout, "fs": fs, "bucket": bucket, "local": local, "run": run}
