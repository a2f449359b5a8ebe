"""Automatic restart after a worker crash, for real: a Ray Train worker process is killed
with SIGKILL from outside once a checkpoint has been reported; Ray Train restarts the
worker group (``fault_tolerance.max_failures``), which resumes from that checkpoint.

The reference is an uninterrupted run of the same config: exact resume holds on CPU, so
the final weights and every step's loss must be equal.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from m2d_cli import local_env

from infra.config import ClusterProfile, resolve_run
from infra.job_entry import spec_argv
from infra.job_specs import SynthSpec, TrainJobSpec
from infra.tracking import Tracker

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# Enough steps after the first checkpoint for the kill to land mid-run on a loaded machine
# (at 16 the run could be over before a starved test process saw its first checkpoint).
STEPS = 40
EVERY = 2
VALIDATE = 3
WORKER_TITLE = "ray::RayTrainWorker"


@pytest.fixture(scope="module")
def pretrain_manifest(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    spec = SynthSpec(out=str(out), stories=4, frames=17, height=32, width=32)
    synth = [sys.executable, "-m", "datajobs.synth", *spec_argv(spec)]
    subprocess.run(synth, check=True, cwd=ROOT)
    return out / "pretrain.jsonl"


def write_run(
    root: Path, name: str, manifest: Path, tracking_uri: str, validation: dict | None = None
) -> Path:
    """The `local` profile's pretrain run, STEPS steps, one restart allowed."""
    profile = ClusterProfile.model_validate(
        yaml.safe_load((ROOT / "clusters/local.yaml").read_text())
    )
    overrides = {
        "recipe": {"steps": STEPS, "warmup_steps": 1, "validation": validation or {}},
        "fault_tolerance": {"checkpoint_every": EVERY, "keep_checkpoints": 2, "max_failures": 1},
        "storage": {"root": str(root)},
        "tracking": {"uri": tracking_uri, "experiment": "m2d-fault-it"},
        "data": {"pretrain": str(manifest)},
    }
    run = resolve_run(profile, "local", "pretrain", overrides)
    (root / name).mkdir(parents=True)
    config = root / name / "run_config.json"
    config.write_text(run.model_dump_json())
    return config


def start_job(config: Path) -> subprocess.Popen:
    env = local_env()
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.job", *spec_argv(TrainJobSpec(config=str(config)))],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_a_worker_after_checkpoint(job: subprocess.Popen, run_dir: Path) -> int:
    """Wait for the run's first registered checkpoint, then SIGKILL one train worker.

    The checkpoint is read from Ray Train's own record in the run folder (what a restart
    resumes from), not from MLflow, whose tag arrives later through the tracking server.
    Only the job's own process tree is searched (other Ray clusters may share the host).
    Returns the step of the checkpoint seen.
    """
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 900  # two job start-ups on a loaded machine: minutes
    while time.monotonic() < deadline and job.poll() is None:
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):  # not there yet, or being written
            results = []
        if results:
            workers = [
                p
                for p in psutil.Process(job.pid).children(recursive=True)
                if p.name().startswith(WORKER_TITLE)
            ]
            assert workers, "no Ray Train worker process under the job"
            os.kill(workers[0].pid, signal.SIGKILL)
            return int(results[-1]["metrics"]["step"])
        time.sleep(0.05)
    raise AssertionError("the job reported no checkpoint (or ended) before the kill")


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    states = torch.load(
        run_dir / f"checkpoint_{STEPS:08d}" / "deepspeed" / "mp_rank_00_model_states.pt",
        weights_only=False,
    )
    return states["module"]


def test_worker_killed_after_checkpoint_restarts_and_matches_uninterrupted_run(
    pretrain_manifest, mlflow_server, tmp_path
):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    # Both runs at once (each its own local Ray): the start-up costs overlap. The crashed
    # run validates every VALIDATE steps (not a multiple of EVERY, so the restart may redo
    # a validation step); the reference does not, and the weights must still be equal.
    validation = {"every": VALIDATE, "stories": 1, "seeds": [0, 1], "sampling_steps": 2}
    jobs = {
        name: start_job(
            write_run(
                tmp_path,
                name,
                pretrain_manifest,
                mlflow_server,
                validation if name == "crashed" else None,
            )
        )
        for name in ("reference", "crashed")
    }
    output: dict[str, list[str]] = {name: [] for name in jobs}
    readers = [
        threading.Thread(target=output[name].extend, args=(job.stdout,), daemon=True)
        for name, job in jobs.items()
    ]
    for reader in readers:
        reader.start()  # drain the pipes while waiting for the checkpoint
    crashed = jobs["crashed"]
    seen = kill_a_worker_after_checkpoint(crashed, tmp_path / "crashed")
    for job in jobs.values():
        job.wait(timeout=900)
    for reader in readers:
        reader.join(timeout=30)
    assert jobs["reference"].returncode == 0, "".join(output["reference"])[-3000:]
    log = "".join(output["crashed"])
    assert crashed.returncode == 0, log[-3000:]
    assert log.strip().splitlines()[-1].startswith(f"run crashed finished: step {STEPS}/{STEPS}")

    # The restarted workers resumed from a reported checkpoint, not from step 0.
    resumed = sorted({int(s) for s in re.findall(r"rank 0 resumed at step (\d+)", log)})
    assert len(resumed) == 1 and seen <= resumed[0] < STEPS and resumed[0] % EVERY == 0, resumed

    expected = final_weights(tmp_path / "reference")
    got = final_weights(tmp_path / "crashed")
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key

    # One MLflow run; each step logged once, with the uninterrupted run's loss.
    run_id = json.loads((tmp_path / "crashed" / "mlflow_run.json").read_text())["run_id"]
    reference_id = json.loads((tmp_path / "reference" / "mlflow_run.json").read_text())["run_id"]
    want = {m.step: m.value for m in client.get_metric_history(reference_id, "loss")}
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    assert {m.step: m.value for m in history} == want
    # Each validation step validated once, though the restart redid the steps since its
    # checkpoint: the contact sheets and the cost are in the run once per step.
    validated = list(range(VALIDATE, STEPS + 1, VALIDATE))
    assert [m.step for m in client.get_metric_history(run_id, "validation_s")] == validated
    images = Tracker(mlflow_server, run_id).logged_images()
    keys = {f"validation/story_01/seed{seed}" for seed in (0, 1)}
    assert images == {(key, step): 1 for key in keys for step in validated}
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["checkpoint.latest_step"] == str(STEPS)
