"""The tracking server hangs (a port that accepts and never answers) mid-run: training
goes on at its pace, metrics wait in the job and arrive when it answers again; those it
never took before the end are kept in the run folder and `m2d runs sync` sends them -
each step once."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from m2d_cli import local_env, register_run
from tcp_proxy import SwitchProxy

from infra.config import ClusterProfile, resolve_run
from infra.job_entry import spec_argv
from infra.job_specs import TrainJobSpec

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
M2D = [sys.executable, "-c", "from orchestrator.cli import main; main()"]
STEPS = 900  # about a minute of steps: both outages fall inside the run


def _losses(client, run_id: str) -> list:
    return client.get_metric_history(run_id, "loss")


def test_training_never_waits_on_a_hanging_tracking_server(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    from infra.tracking import PENDING_METRICS, run_id_in

    direct = MlflowClient(mlflow_server)
    with SwitchProxy(urlsplit(mlflow_server).port) as proxy:
        tracking = f"http://127.0.0.1:{proxy.port}"
        profile = ClusterProfile.model_validate(
            yaml.safe_load((ROOT / "clusters/local.yaml").read_text())
        )
        overrides = {
            "recipe": {"steps": STEPS, "warmup_steps": 1},
            "fault_tolerance": {"checkpoint_every": STEPS},
            "storage": {"root": str(tmp_path / "runs")},
            "tracking": {"uri": tracking, "experiment": "m2d-outage"},
            "data": {"synthetic": True},
        }
        run = resolve_run(profile, "local", "pretrain", overrides)
        (tmp_path / "runs" / "hang").mkdir(parents=True)
        config = tmp_path / "runs" / "hang" / "run_config.json"
        config.write_text(run.model_dump_json())
        env = local_env()
        job = subprocess.Popen(
            [sys.executable, "-m", "trainer.job", *spec_argv(TrainJobSpec(config=str(config)))],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while (run_id := run_id_in(str(config.parent), None)) is None or not _losses(
                direct, run_id
            ):
                assert job.poll() is None and time.monotonic() < deadline, "no step logged"
                time.sleep(0.5)
            proxy.blackhole = True  # hangs: accepts, never answers
            outage = (time.time() * 1000, None)
            time.sleep(15)
            proxy.blackhole = False
            outage = (outage[0], time.time() * 1000)
            while max(m.timestamp for m in _losses(direct, run_id)) < outage[1]:
                assert job.poll() is None, "the run ended before MLflow caught up"
                time.sleep(0.5)  # the writer backs off, then sends what waited
            assert job.poll() is None, "the run ended too soon for a second outage"
            proxy.blackhole = True  # and hangs again until the job has ended
            output, _ = job.communicate(timeout=600)
        finally:
            if job.poll() is None:
                job.kill()
        assert job.returncode == 0, output[-3000:]
        assert "does not take metrics" in output and "MLflow answers again" in output
        assert "`m2d runs sync RUN` sends them" in output, output[-3000:]
        pending = config.parent / PENDING_METRICS
        assert pending.exists()

        history = _losses(direct, run_id)
        steps = [m.step for m in history]
        assert len(steps) == len(set(steps)) and max(steps) < STEPS  # the end waits in the file
        # Steps went on during the first outage, and arrived once it answered again.
        during = [m for m in history if outage[0] <= m.timestamp <= outage[1]]
        assert len(during) >= 10, (outage, [m.timestamp for m in history][:5])

        proxy.blackhole = False
        register_run("hang", str(config.parent), tracking_uri=tracking)
        synced = subprocess.run(
            [*M2D, "runs", "sync", "hang"], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert synced.returncode == 0, synced.stderr
        assert "metric value(s) sent to MLflow" in synced.stdout and not pending.exists()
    history = _losses(direct, run_id)
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))  # each step once
    stamps = sorted(m.timestamp for m in history)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert max(gaps) < 5000, max(gaps)  # no step waited on the server (its timeout: 10 s)
