"""What the training-job tests share: the `local` profile's run shrunk to STEPS steps,
the job started as the launcher starts it, and readers of checkpoints and MLflow.

Small on purpose (tiny model, 3 scenes x 9 frames at 32x32, 6 steps): each run costs
about a minute of Ray and DeepSpeed start-up on a 2-core machine. Six steps because
DeepSpeed's WarmupLR gives lr 0 to the first two; resume tests stop after step 3,
once the weights have really moved.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from m2d_cli import local_env
from pydantic import BaseModel

from infra.checkpoint_layout import WEIGHTS
from infra.config import ClusterProfile, RunConfig, StorageConfig, resolve_run
from infra.job_entry import spec_argv
from infra.job_specs import TrainJobSpec

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
EVERY = 3


def make_run(storage: dict, tracking_uri: str, stage: str = "pretrain", **changes) -> RunConfig:
    """The `local` profile's run for ``stage``, shrunk to STEPS steps."""
    profile = ClusterProfile.model_validate(
        yaml.safe_load((ROOT / "clusters/local.yaml").read_text())
    )
    overrides = {
        "recipe": {"steps": STEPS, "warmup_steps": 1},
        "fault_tolerance": {"checkpoint_every": EVERY, "keep_checkpoints": 2, "max_failures": 0},
        "storage": storage,
        "tracking": {"uri": tracking_uri, "experiment": "m2d-it"},
    }
    for key, value in changes.items():
        section, name = key.split("__")
        overrides.setdefault(section, {})[name] = value
    return resolve_run(profile, "local", stage, overrides)


def run_entry(module: str, spec: BaseModel, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m module`` with its spec, as the launcher starts a local job: in the
    checkout, joining no cluster of this shell's, its output captured."""
    env = local_env()
    return subprocess.run(
        [sys.executable, "-m", module, *spec_argv(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_job(
    config_uri: str, endpoint_url: str | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """The training job of the run config at ``config_uri``."""
    storage = StorageConfig(root=config_uri, endpoint_url=endpoint_url) if endpoint_url else None
    spec = TrainJobSpec(config=config_uri, storage=storage)
    return run_entry("trainer.job", spec, timeout)


def module_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    states = torch.load(checkpoint / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)
    return states["module"]


def whole_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The transformer's weights file of a checkpoint (whole under ZeRO-3 too)."""
    return safetensors.torch.load_file(checkpoint / WEIGHTS)


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def loss_history(tracking_uri: str, run_id: str) -> list[tuple[int, float]]:
    history = mlflow_client(tracking_uri).get_metric_history(run_id, "loss")
    return [(m.step, m.value) for m in history]


def assert_continues_like(resumed: Path, reference: Path, losses, reference_losses) -> None:
    """The resharded run ends where the uninterrupted one does, up to the order in which
    floating-point sums are taken (an all-reduce over ranks vs accumulated micro-batches),
    far closer than what the three steps after the stop moved the weights: it trained the
    same stories with the same noise - a story repeated or skipped would move them apart."""
    ours, theirs = whole_weights(resumed), whole_weights(reference)
    stopped = whole_weights(reference.parent / f"checkpoint_{EVERY:08d}")
    moved = max((theirs[k] - stopped[k]).abs().max().item() for k in theirs)
    apart = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    print(f"weights apart {apart:.3g}, moved {moved:.3g}")
    assert apart < 1e-4 * moved, (apart, moved)
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))  # each step once
    values = [loss for _, loss in losses]
    assert values == pytest.approx([loss for _, loss in reference_losses], rel=1e-4)
