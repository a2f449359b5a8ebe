"""What a short local training job costs around its steps: Ray Train's poll interval.

A local job (``python -m trainer.job`` on the `local` profile: its own Ray, 2 CPU workers,
the tiny model, random stories, ``--steps`` steps with a checkpoint every 3) spends a few
seconds training and most of its time starting and stopping Ray, Ray Train's controller and
workers. Ray Train's controller learns of each worker event (group started, a report, the
end) at its next poll, every 2 s by default; m2d's local Ray polls every 0.5 s
(``infra.ray_runtime.LOCAL_WORKER_ENV``). This runs the same job in rounds - Ray's default,
then m2d's, ``--rounds`` times - and prints each job's wall time and the ratio of the
medians (default / m2d: above 1 means m2d's setting is faster). Every m2d test that
trains, ``make demo`` and the mask ablation start such jobs.

    python benchmarks/launch_overhead.py [--rounds 3 --steps 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infra.config import ClusterProfile, resolve_run  # noqa: E402
from infra.job_entry import spec_argv  # noqa: E402
from infra.job_specs import TrainJobSpec  # noqa: E402

INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
RAY_DEFAULT = "2.0"


def run_config(folder: Path, steps: int) -> Path:
    profile = ClusterProfile.model_validate(
        yaml.safe_load((ROOT / "clusters/local.yaml").read_text())
    )
    run = resolve_run(
        profile,
        "local",
        "pretrain",
        {
            "recipe": {"steps": steps, "warmup_steps": 1},
            "fault_tolerance": {"checkpoint_every": 3, "max_failures": 0},
            "storage": {"root": str(folder)},
            "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "overhead"},
            "data": {"synthetic": True},
        },
    )
    (folder / "run").mkdir(parents=True)
    path = folder / "run" / "run_config.json"
    path.write_text(run.model_dump_json())
    return path


def job_seconds(scratch: Path, steps: int, interval: str | None) -> float:
    """Wall time of one fresh job, from its process start to its exit."""
    folder = Path(tempfile.mkdtemp(dir=scratch))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", INTERVAL)}
    env["M2D_HOME"] = str(folder / "home")
    if interval is not None:
        env[INTERVAL] = interval
    spec = TrainJobSpec(config=str(run_config(folder, steps)))
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "trainer.job", *spec_argv(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"job failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    ours, default = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(1, args.rounds + 1):
            default.append(job_seconds(Path(scratch), args.steps, RAY_DEFAULT))
            ours.append(job_seconds(Path(scratch), args.steps, None))
            print(
                f"round {round_}: Ray's default poll ({RAY_DEFAULT} s) {default[-1]:.1f} s, "
                f"m2d's local poll {ours[-1]:.1f} s",
                flush=True,
            )
    slow, fast = statistics.median(default), statistics.median(ours)
    print(
        f"median job wall time: Ray's default {slow:.1f} s, m2d's {fast:.1f} s; "
        f"default / m2d = {slow / fast:.2f}x ({slow - fast:.1f} s less per job)"
    )


if __name__ == "__main__":
    main()
