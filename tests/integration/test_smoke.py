"""`m2d launch --smoke` on the `local` profile: pretrain then SFT from it, each trained,
checkpointed and resumed for real (Ray Train, DeepSpeed, an MLflow server), in runs of
their own; and a smoke run that must fail says so in its table and exit status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from m2d_cli import local_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
M2D = [sys.executable, "-c", "from orchestrator.cli import main; main()"]


@pytest.fixture
def workspace(tmp_path, mlflow_server):
    data = tmp_path / "data"
    synth = ["data", "synth", "--out", str(data), "--stories", "4", "--frames", "17"]
    subprocess.run([*M2D, *synth], check=True, cwd=ROOT)
    env = local_env(M2D_HOME=str(tmp_path / "home"))
    sets = {
        "storage.root": str(tmp_path / "runs"),
        "tracking.uri": mlflow_server,
        "tracking.experiment": "m2d-smoke-it",
        "data.pretrain": str(data / "pretrain.jsonl"),
        "data.sft": str(data / "sft.jsonl"),
    }
    flags = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    return {"root": tmp_path, "env": env, "flags": flags}


def m2d(workspace, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*M2D, *args], cwd=ROOT, env=workspace["env"], capture_output=True, text=True, timeout=900
    )


def table_rows(stdout: str) -> dict[tuple[str, str], str]:
    """(stage, check) -> PASS/FAIL from the printed table."""
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        if len(cells) >= 3 and cells[0] in ("pretrain", "sft") and cells[2] in ("PASS", "FAIL"):
            rows[(cells[0], cells[1])] = cells[2]
    return rows


def test_smoke_pretrain_then_sft_passes_in_runs_of_its_own(workspace, mlflow_server):
    done = m2d(
        workspace,
        "launch",
        "--cluster",
        "local",
        "--stage",
        "pretrain",
        "--smoke",
        *workspace["flags"],
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = table_rows(done.stdout)
    checks = ("train", "checkpoint", "resume")
    assert rows == {
        **{("pretrain", c): "PASS" for c in checks},
        **{("sft", c): "PASS" for c in checks},
        ("sft", "linked"): "PASS",
    }, done.stdout

    records = {
        p.stem: json.loads(p.read_text())
        for p in (workspace["root"] / "home" / "runs").glob("*.json")
    }
    assert len(records) == 2 and all("-smoke-" in name for name in records)
    assert all(r["smoke"] for r in records.values())
    pre = next(r for r in records.values() if r["stage"] == "pretrain")
    sft = next(r for r in records.values() if r["stage"] == "sft")
    config = json.loads(Path(sft["config_uri"]).read_text())
    assert config["init_from"] == f"{pre['run_dir']}/checkpoint_00000004"
    assert config["recipe"]["frames"] == 9 and config["recipe"]["height"] == 16

    # The smoke SFT's checkpoint exports to a folder stock diffusers loads; never over one.
    out = workspace["root"] / "exported"
    exported = m2d(workspace, "export", Path(sft["run_dir"]).name, "--out", str(out))
    assert exported.returncode == 0, exported.stdout + exported.stderr
    from diffusers import CogVideoXTransformer3DModel

    assert sum(p.numel() for p in CogVideoXTransformer3DModel.from_pretrained(out).parameters())
    refused = m2d(workspace, "export", Path(sft["run_dir"]).name, "--out", str(out))
    assert refused.returncode == 2 and "not empty" in refused.stderr

    # A smoke run is never what a real SFT starts from.
    refused = m2d(workspace, "launch", "--cluster", "local", "--stage", "sft", *workspace["flags"])
    assert refused.returncode == 2 and "no finished pretrain run" in refused.stderr

    # Independent of the table: MLflow holds the pretrain smoke's steps once each, and the
    # SFT smoke run names it as the run it started from (a run of its own in the table).
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    pre_id = json.loads((Path(pre["run_dir"]) / "mlflow_run.json").read_text())["run_id"]
    sft_id = json.loads((Path(sft["run_dir"]) / "mlflow_run.json").read_text())["run_id"]
    assert sorted(m.step for m in client.get_metric_history(pre_id, "loss")) == [1, 2, 3, 4]
    sft_tags = client.get_run(sft_id).data.tags
    assert sft_tags["m2d.started_from"] == pre_id and "mlflow.parentRunId" not in sft_tags


def test_smoke_that_cannot_train_fails_its_rows_and_exits_1(workspace):
    flags = [*workspace["flags"], "--set", "data.pretrain=null"]  # fails before Ray starts
    done = m2d(workspace, "launch", "--cluster", "local", "--stage", "pretrain", "--smoke", *flags)
    assert done.returncode == 1, done.stdout + done.stderr
    assert table_rows(done.stdout) == {
        ("pretrain", "train"): "FAIL",
        ("pretrain", "checkpoint"): "FAIL",
        ("pretrain", "resume"): "FAIL",
    }
    # The job's own line is a message: on stderr (the table is the data, on stdout).
    errors = done.stderr.strip().splitlines()
    assert any(line.startswith("error: stage pretrain needs its manifest") for line in errors)
    assert errors[-1] == "Error: smoke test failed: 3 of 3 checks"
    assert "Traceback" not in done.stderr
