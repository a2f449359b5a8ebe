"""`m2d` end to end, as a user types it: launch locally and on a Ray cluster, follow, stop,
chain SFT from pretrain, export for diffusers. Real Ray, DeepSpeed and MLflow servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
M2D = [sys.executable, "-c", "from orchestrator.cli import main; main()"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, mlflow_server):
    """Synthetic data, a private run registry, and --set flags pointing at them."""
    root = tmp_path_factory.mktemp("launch")
    data = root / "data"
    synth = ["data", "synth", "--out", str(data), "--stories", "4", "--frames", "17"]
    subprocess.run([*M2D, *synth], check=True, cwd=ROOT)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["M2D_HOME"] = str(root / "home")
    sets = {
        "storage.root": str(root / "runs"),
        "tracking.uri": mlflow_server,
        "tracking.experiment": "m2d-launch-it",
        "data.pretrain": str(data / "pretrain.jsonl"),
        "data.sft": str(data / "sft.jsonl"),
        "recipe.steps": "4",
        "recipe.warmup_steps": "1",
        "fault_tolerance.checkpoint_every": "2",
    }
    flags = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    return {"root": root, "env": env, "flags": flags}


def m2d(workspace, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # The Ray head fixture may have started after the workspace: pass its token along.
    auth = {k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH_")}
    return subprocess.run(
        [*M2D, *args],
        cwd=ROOT,
        env={**workspace["env"], **auth},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _records(workspace) -> dict[str, dict]:
    folder = Path(workspace["env"]["M2D_HOME"]) / "runs"
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}


def test_local_pretrain_then_sft_then_export(workspace, tmp_path, mlflow_server):
    flags = workspace["flags"]
    pre = m2d(
        workspace, "launch", "--cluster", "local", "--stage", "pretrain", "--name", "pre", *flags
    )
    assert pre.returncode == 0, pre.stdout + pre.stderr
    assert "run pre: pretrain on local" in pre.stdout
    assert (workspace["root"] / "runs" / "pre" / "run_config.json").is_file()

    again = m2d(
        workspace, "launch", "--cluster", "local", "--stage", "pretrain", "--name", "pre", *flags
    )
    assert again.returncode == 2 and "already exists" in again.stderr

    sft = m2d(workspace, "launch", "--cluster", "local", "--stage", "sft", "--name", "sft", *flags)
    assert sft.returncode == 0, sft.stdout + sft.stderr
    saved = json.loads((workspace["root"] / "runs" / "sft" / "run_config.json").read_text())
    assert saved["init_from"].startswith(str(workspace["root"] / "runs" / "pre" / "checkpoint_"))
    from mlflow.tracking import MlflowClient

    ids = {
        name: json.loads((workspace["root"] / "runs" / name / "mlflow_run.json").read_text())
        for name in ("pre", "sft")
    }
    sft_tags = MlflowClient(tracking_uri=mlflow_server).get_run(ids["sft"]["run_id"]).data.tags
    assert sft_tags["mlflow.parentRunId"] == ids["pre"]["run_id"]  # SFT nested under pretrain

    table = m2d(workspace, "runs")
    assert table.returncode == 0
    for name in ("pre", "sft"):
        assert name in table.stdout
    assert table.stdout.count("SUCCEEDED") >= 2

    out = tmp_path / "exported"
    exported = m2d(workspace, "export", "sft", "--out", str(out))
    assert exported.returncode == 0, exported.stdout + exported.stderr
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) > 0
    refused = m2d(workspace, "export", "sft", "--out", str(out))
    assert refused.returncode == 2 and "not empty" in refused.stderr


def _wait_state(workspace, name: str, wanted: set[str], timeout: float = 420) -> str:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        status = m2d(workspace, "status", name)
        state = next(
            (
                line.split(":", 1)[1].strip()
                for line in status.stdout.splitlines()
                if line.startswith("state:")
            ),
            "",
        )
        if state in wanted:
            return state
        time.sleep(2)
    raise AssertionError(f"run {name} stayed {state!r}, wanted {wanted}")


def test_remote_launch_status_logs_stop(workspace, ray_head):
    flags = [*workspace["flags"], "--set", f"ray.address={ray_head}"]
    done = m2d(
        workspace, "launch", "--cluster", "local", "--stage", "pretrain", "--name", "remote", *flags
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"submitted to {ray_head}" in done.stdout
    assert _records(workspace)["remote"]["kind"] == "remote"
    assert _wait_state(workspace, "remote", {"SUCCEEDED", "FAILED"}) == "SUCCEEDED"
    logs = m2d(workspace, "logs", "remote")
    assert logs.returncode == 0 and logs.stdout.strip()

    long_run = [*flags, "--set", "recipe.steps=1000"]
    m2d(
        workspace,
        "launch",
        "--cluster",
        "local",
        "--stage",
        "pretrain",
        "--name",
        "long",
        *long_run,
    )
    _wait_state(workspace, "long", {"RUNNING"})
    stop = m2d(workspace, "stop", "long")
    assert stop.returncode == 0 and "stopping" in stop.stdout
    assert _wait_state(workspace, "long", {"STOPPED", "FAILED"}) == "STOPPED"


def test_unreachable_cluster_is_one_line(workspace):
    flags = [*workspace["flags"], "--set", "ray.address=http://127.0.0.1:9"]
    result = m2d(workspace, "launch", "--cluster", "local", "--stage", "pretrain", *flags)
    assert result.returncode == 2
    assert "cannot reach the Ray cluster at http://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr
