"""`m2d` on a Ray cluster, as a user types it: launch through the Jobs API, status, logs,
stop, resume. Real Ray, DeepSpeed and MLflow servers. (Local launches, SFT chained from
pretrain and export run in test_smoke.py, whose smoke runs are real local launches.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from m2d_cli import M2D, ROOT, local_env, run_m2d, wait_state
from webhook import Receiver

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, mlflow_server):
    """Synthetic data, a private run registry, and --set flags pointing at them."""
    root = tmp_path_factory.mktemp("launch")
    data = root / "data"
    synth = ["data", "synth", "--out", str(data), "--stories", "4", "--frames", "17"]
    subprocess.run([*M2D, *synth], check=True, cwd=ROOT)
    env = local_env(M2D_HOME=str(root / "home"))
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
    return {"root": root, "env": env, "flags": flags, "tracking": mlflow_server}


def m2d(workspace, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # The Ray head fixture may have started after the workspace: pass its token along.
    auth = {k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH_")}
    return run_m2d({**workspace["env"], **auth}, *args, timeout=timeout)


def _records(workspace) -> dict[str, dict]:
    folder = Path(workspace["env"]["M2D_HOME"]) / "runs"
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}


def _wait_state(workspace, name: str, wanted: set[str], timeout: float = 420) -> str:
    auth = {k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH_")}
    return wait_state({**workspace["env"], **auth}, name, wanted, timeout)


def _wait_log(workspace, name: str, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in m2d(workspace, "logs", name).stdout:
        assert time.monotonic() < deadline, f"{text!r} never appeared in the logs of {name}"
        time.sleep(2)


def _mlflow_status(workspace, name: str) -> str:
    from mlflow.tracking import MlflowClient

    run_dir = Path(_records(workspace)[name]["run_dir"])
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    return MlflowClient(workspace["tracking"]).get_run(run_id).info.status


def test_remote_launch_refuses_workers_the_cluster_cannot_hold(workspace, ray_head):
    """The session's head has 2 CPUs on one node; 4 one-CPU workers would wait forever."""
    flags = [*workspace["flags"], "--set", f"ray.address={ray_head}"]
    wide = ["--set", "workers.num_workers=4", "--set", "recipe.global_batch=4"]
    done = m2d(workspace, "launch", "--cluster", "local", "--stage", "pretrain", *flags, *wide)
    assert done.returncode == 2, done.stdout + done.stderr
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "needs 1 node(s) with 4 CPU each" in line and " CPU=2)" in line
    assert not _records(workspace)  # refused before any run was recorded
    from orchestrator.placement import cluster_nodes

    nodes = cluster_nodes(ray_head)  # Ray's own view of the head, as the check read it
    assert [n.resources["CPU"] for n in nodes] == [2.0]


def test_a_remote_job_runs_the_submitting_checkouts_code(workspace, ray_head, tmp_path):
    """Launched from a copy of the checkout with a change the cluster's installed m2d (this
    repository, installed editable in the head's environment) lacks: the job runs the
    change, because the launcher ships its own packages with the job."""
    import shutil
    import uuid

    from orchestrator.submit import SHIPPED_PACKAGES

    copy = tmp_path / "checkout"
    for package in (*SHIPPED_PACKAGES, "clusters"):
        shutil.copytree(
            ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    marker = f"shipped-code-{uuid.uuid4().hex[:8]}"
    job = copy / "trainer" / "job.py"
    text = job.read_text()
    future = "from __future__ import annotations\n"
    job.write_text(text.replace(future, f"{future}print({marker!r}, flush=True)\n", 1))
    assert marker not in (ROOT / "trainer" / "job.py").read_text()
    launcher = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(copy)!r}); "
                "from orchestrator.cli import main; main()"]  # fmt: skip
    flags = [*workspace["flags"], "--set", f"ray.address={ray_head}", "--set", "recipe.steps=2"]
    auth = {k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH_")}
    done = subprocess.run(
        [*launcher, "launch", "--cluster", "local", "--stage", "pretrain", "--name", "shipped",
         *flags],
        cwd=copy, env={**workspace["env"], **auth}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert _wait_state(workspace, "shipped", {"SUCCEEDED", "FAILED"}) == "SUCCEEDED"
    assert marker in m2d(workspace, "logs", "shipped", "--all").stdout


def test_remote_launch_status_logs_stop(workspace, ray_head):
    flags = [*workspace["flags"], "--set", f"ray.address={ray_head}"]
    done = m2d(
        workspace, "launch", "--cluster", "local", "--stage", "pretrain", "--name", "remote", *flags
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"submitted to {ray_head}" in done.stdout
    record = _records(workspace)["remote"]
    assert record["kind"] == "remote"
    # The launcher opened the MLflow run (so it could print its URL); the job continued it.
    run_id = json.loads((Path(record["run_dir"]) / "mlflow_run.json").read_text())["run_id"]
    url = f"MLflow run: {workspace['tracking']}/#/experiments/"
    assert url in done.stdout and done.stdout.split(url, 1)[1].split()[0].endswith(run_id)
    assert _wait_state(workspace, "remote", {"SUCCEEDED", "FAILED"}) == "SUCCEEDED"
    logs = m2d(workspace, "logs", "remote")
    assert logs.returncode == 0 and logs.stdout.strip()
    assert f"MLflow run {workspace['tracking']}/#/experiments/" in logs.stdout  # the same run
    assert run_id in logs.stdout.split("MLflow run ", 1)[1].splitlines()[0]
    row = next(line for line in m2d(workspace, "runs").stdout.splitlines() if " remote " in line)
    # run, stage, cluster, state, step, loss, checkpoints, latest
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    assert cells[3:5] == ["SUCCEEDED", "4"] and float(cells[5]) > 0

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
    _wait_log(workspace, "long", "MLflow run ")  # the driver is past its imports
    stop = m2d(workspace, "stop", "long")
    assert stop.returncode == 0 and "stopping" in stop.stdout
    assert _wait_state(workspace, "long", {"STOPPED", "FAILED"}) == "STOPPED"
    assert _mlflow_status(workspace, "long") == "KILLED"  # not RUNNING with no job behind it

    # A resume is a new Ray job (Ray refuses a job name twice); status follows it.
    resumed = m2d(workspace, "launch", "--resume", "long")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _records(workspace)["long"]["job_id"] == "long-resume-1"
    _wait_state(workspace, "long", {"RUNNING"})
    assert _mlflow_status(workspace, "long") == "RUNNING"  # the same MLflow run, continued
    assert m2d(workspace, "stop", "long").returncode == 0
    assert _wait_state(workspace, "long", {"STOPPED", "FAILED"}) == "STOPPED"


def test_unreachable_cluster_is_one_line(workspace):
    flags = [*workspace["flags"], "--set", "ray.address=http://127.0.0.1:9"]
    result = m2d(workspace, "launch", "--cluster", "local", "--stage", "pretrain", *flags)
    assert result.returncode == 2
    assert "cannot reach the Ray cluster at http://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_refused_submission_leaves_no_mlflow_run_running(tmp_path, monkeypatch, mlflow_server):
    # The launcher opened the MLflow run; Ray then refused the job (say, a runtime_env it
    # cannot build): the run is ended as FAILED, not left RUNNING with no job behind it.
    from click.testing import CliRunner
    from mlflow.tracking import MlflowClient

    from infra.errors import ServiceError
    from orchestrator import ray_jobs, submit
    from orchestrator.cli import cli

    def refuse(record, run, submission_id=None):
        raise ServiceError(f"Ray refused the job {record.name}: no such image")

    monkeypatch.setenv("M2D_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(ray_jobs, "job_client", lambda address: object())
    monkeypatch.setattr(submit, "submit_remote", refuse)
    manifest = tmp_path / "pretrain.jsonl"
    manifest.write_text("")
    uri = mlflow_server
    sets = {
        "ray.address": "http://127.0.0.1:8265",
        "storage.root": str(tmp_path / "runs"),
        "tracking.uri": uri,
        "data.pretrain": str(manifest),
    }
    argv = ["launch", "--cluster", "local", "--stage", "pretrain", "--name", "refused"]
    result = CliRunner().invoke(cli, [*argv, *(f"--set={k}={v}" for k, v in sets.items())])
    assert result.exit_code == 2, result.output
    assert "Ray refused the job refused: no such image" in result.output
    # The run folder the launcher made is gone (the name is free again); the MLflow run it
    # opened, named on the console, is ended.
    assert not (tmp_path / "runs" / "refused").exists()
    opened = next(line for line in result.output.splitlines() if line.startswith("MLflow run: "))
    run_id = opened.rstrip("/").rsplit("/", 1)[-1]
    assert MlflowClient(uri).get_run(run_id).info.status == "FAILED"


def test_a_local_launch_shows_m2ds_lines_and_logs_the_rest(workspace):
    """A 200-step local launch, as `make demo` runs it: fewer than 40 lines on the console,
    all m2d's; Ray's and DeepSpeed's output (every worker's) is in the run's log file."""
    sets = ["recipe.steps=200", "fault_tolerance.checkpoint_every=50"]
    sets.append("notify.webhook_env=M2D_TEST_WEBHOOK")  # the run's events posted, below
    flags = [*workspace["flags"], *(arg for value in sets for arg in ("--set", value))]
    with Receiver() as hook:
        hooked = {**workspace, "env": {**workspace["env"], "M2D_TEST_WEBHOOK": hook.url}}
        done = m2d(
            hooked, "launch", "--cluster", "local", "--stage", "pretrain", "--name", "quiet", *flags
        )
    assert done.returncode == 0, done.stdout + done.stderr
    # Its webhook heard it start, checkpoint every 50 steps and finish, in that order.
    assert [(p["event"], p.get("step")) for p in hook.posts] == [
        ("started", None),
        *(("checkpoint", step) for step in (50, 100, 150, 200)),
        ("finished", 200),
    ]
    assert all(p["run"] == "quiet" and "/#/experiments/" in p["mlflow"] for p in hook.posts)
    assert hook.posts[1]["checkpoint"].endswith("/quiet/checkpoint_00000050")
    lines = (done.stdout + done.stderr).splitlines()
    assert len(lines) < 40, "\n".join(lines)
    ours = (
        "run quiet",
        "MLflow run",
        "log: ",
        "step ",
        "DeepSpeed ZeRO-2 engine: ",
        "rank 0 of 2: ",
        "loss ",
    )
    assert all(line.startswith(ours) for line in lines), "\n".join(lines)
    assert done.stdout.splitlines()[-1].startswith("run quiet finished: step 200/200")
    # The loss trend over the steps MLflow holds, just before the summary.
    trend = done.stdout.splitlines()[-2]
    assert trend.startswith("loss ") and trend.endswith("the mean of the first and last 20 steps")
    progress = [line for line in done.stderr.splitlines() if line.startswith("step ")]
    assert progress[-1].startswith("step 200/200") and "checkpoints 4  restarts 0" in progress[-1]
    log = Path(_records(workspace)["quiet"]["log_path"])
    assert done.stderr.splitlines()[0] == f"log: {log}"
    text = log.read_text()
    for noise in ("(RayTrainWorker pid=", "Reporting training result", "[real_accelerator.py"):
        assert noise in text, noise
    # (How many report lines the log holds is Ray's: its deduplicator folds lines that
    # differ only in numbers - both ranks', and successive reports' - into one.)
