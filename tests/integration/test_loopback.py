"""A local training job listens on loopback only: its Ray (GCS, raylet, agents, workers),
Ray Train's workers and their torch process group (gloo, the rendezvous store). And its
training workers run at the priority of the job that started them, not below Ray's
daemons, with no preemption watcher beside them, Ray Train's controller polls them every
0.5 s and the dashboard agent's node stats come once a minute (``infra.ray_runtime``).

The real job (``python -m trainer.job`` on the `local` profile, random stories) runs until
it has reported a step; then every listening socket of its processes and of its Ray
session is read, the job is stopped, and nothing of the session may outlive it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest
import yaml
from ray_session import ray_session, stop_group, wait_gone

from infra.config import ClusterProfile, resolve_run
from infra.job_entry import spec_argv
from infra.job_specs import TrainJobSpec

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


class Listener(NamedTuple):
    ip: str
    port: int
    kind: str
    pid: int
    name: str


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if address.version == 6 and address.ipv4_mapped:  # ::ffff:127.0.0.1
        address = address.ipv4_mapped
    return address.is_loopback


def _listeners(processes: list[psutil.Process]) -> list[Listener]:
    """Listening TCP sockets, and bound unconnected UDP ones, of these processes."""
    found = []
    for process in processes:
        try:
            name = process.name()
            for conn in process.net_connections(kind="inet"):
                udp = conn.type == socket.SOCK_DGRAM
                if conn.status == psutil.CONN_LISTEN or (udp and not conn.raddr):
                    kind = "udp" if udp else "tcp"
                    found.append(Listener(conn.laddr.ip, conn.laddr.port, kind, process.pid, name))
        except psutil.NoSuchProcess:
            continue
    return found


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return ""


def _wait_for(ready, job: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if job.poll() is not None:
            pytest.fail(f"job exited with {job.returncode} early:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"job not ready within {timeout:.0f}s:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)


def _local_run(tmp_path: Path) -> Path:
    """A long `local` pretrain run with no checkpoint before it is stopped."""
    profile = ClusterProfile.model_validate(
        yaml.safe_load((REPO / "clusters/local.yaml").read_text())
    )
    run = resolve_run(
        profile,
        "local",
        "pretrain",
        {
            "recipe": {"steps": 100_000},
            "fault_tolerance": {"checkpoint_every": 100_000, "max_failures": 0},
            "storage": {"root": str(tmp_path / "runs")},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "loopback"},
            "data": {"synthetic": True},
        },
    )
    folder = tmp_path / "runs" / "loopback"
    folder.mkdir(parents=True)
    (folder / "run_config.json").write_text(run.model_dump_json())
    return folder / "run_config.json"


def test_local_job_listens_on_loopback_only(tmp_path):
    log = tmp_path / "job.log"
    env = dict(os.environ)
    # A local job as a user starts it: no cluster to join, none of init_ray's settings.
    for name in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(name, None)
    spec = TrainJobSpec(config=str(_local_run(tmp_path)))
    with log.open("w") as out:
        job = subprocess.Popen(
            [sys.executable, "-m", "trainer.job", *spec_argv(spec)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    session: list[psutil.Process] = []
    try:
        _wait_for(lambda: 'm2d.progress: {"step"' in log.read_text(), job, log, timeout=240)
        session = ray_session(psutil.Process(job.pid))
        listeners = _listeners(session)
        names = {listener.name for listener in listeners}
        assert {"gcs_server", "raylet", "ray::RayTrainWorker"} <= names, listeners
        exposed = [listener for listener in listeners if not _loopback(listener.ip)]
        assert not exposed, "\n".join(map(str, exposed))
        # Both ranks' gloo listeners and rank 0's rendezvous store are among them.
        workers = [lst for lst in listeners if lst.name == "ray::RayTrainWorker"]
        assert len({lst.pid for lst in workers}) == 2 and len(workers) >= 5, workers
        # Ray's own default would be 15 (ray-project/ray#24928).
        job_nice = psutil.Process(job.pid).nice()
        assert {psutil.Process(lst.pid).nice() for lst in workers} == {job_nice}
        assert "ray::PreemptionWatcher" not in {_name(p) for p in session}
        # Ray Train's controller polls the workers every 0.5 s, not Ray's 2 s.
        controllers = [p for p in session if _name(p).startswith("ray::TrainController")]
        assert len(controllers) == 1, session
        assert controllers[0].environ().get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S") == "0.5"
        # The dashboard agent composes its node stats once a minute, not every 5 s. It
        # retitles itself over its environment; the raylet that started it has the same.
        raylets = [p for p in session if _name(p) == "raylet"]
        assert len(raylets) == 1, session
        assert raylets[0].environ().get("REPORTER_UPDATE_INTERVAL_MS") == "60000"
    finally:
        stop_group(job, timeout=60)
        left = wait_gone(session)
    assert not left, f"left running after the job: {left}"
