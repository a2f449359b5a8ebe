"""Golden losses: the first 30 steps of the `local` recipe - pre-training, then SFT from its
checkpoint - as the real job runs them (Ray Train, 2 CPU workers, DeepSpeed ZeRO-2, mp4
stories from `m2d data synth`), against the values in tests/assets/losses/, at a stated
tolerance. A silent change to the data, the tasks, the mask, the loss or the optimizer
moves them; `0 < loss < 10` never would.

Record them again (after a change that is meant to move them) with

    .venv/bin/python tests/integration/test_golden_loss.py --record
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from training_runs import run_job

from datajobs.synth import synthesize
from infra.config import ClusterProfile, RunConfig, resolve_run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "tests" / "assets" / "losses"
STEPS = 30
# The losses come back bit for bit: the same run twice, and the pre-training run under
# ZeRO-3 instead of ZeRO-2 (other partitions and reductions), matched to 0.0 relative. The
# loaded-machine deviations seen before (5e-4 at one step, in CI too) were the dataset,
# not the training: x264's macroblock tree made `m2d data synth` write a different mp4 now
# and then (infra/video.py). Other CPUs' kernels round differently, and rounding-level
# changes moved sampled latents by about 1e-5 relative (test_sample_batch.py): 1e-4 leaves
# room. It cannot be much looser: on this tiny, barely trained model the wrong mask (`full`
# for `v2`) moves the first five losses by only 1.5e-3 relative, which the second test
# checks stays above 10 x RTOL.
RTOL = 1e-4


def _run(root: Path, stage: str, **overrides) -> RunConfig:
    profile = ClusterProfile.model_validate(
        yaml.safe_load((ROOT / "clusters" / "local.yaml").read_text())
    )
    data = {
        "pretrain": str(root / "data" / "pretrain.jsonl"),
        "sft": str(root / "data" / "sft.jsonl"),
    }
    settings = {
        "recipe": {"steps": STEPS},
        "fault_tolerance": {"checkpoint_every": STEPS, "max_failures": 0},
        "storage": {"root": str(root / "runs")},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "golden"},
        "data": data,
    }
    for key, value in overrides.items():
        section, field = key.split("__")
        settings.setdefault(section, {})[field] = value
    return resolve_run(profile, "local", stage, settings)


def _losses(root: Path, name: str, run: RunConfig) -> list[float]:
    """Train ``run`` as `m2d launch` does (its run folder, the job's entry point); the
    loss of every step, from MLflow."""
    from mlflow.tracking import MlflowClient

    folder = root / "runs" / name
    folder.mkdir(parents=True)
    (folder / "run_config.json").write_text(run.model_dump_json())
    done = run_job(str(folder / "run_config.json"), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = json.loads((folder / "mlflow_run.json").read_text())["run_id"]
    history = MlflowClient(run.tracking.uri).get_metric_history(run_id, "loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(
        range(1, run.recipe.steps + 1)
    )
    return losses


def _dataset(root: Path) -> None:
    synthesize(str(root / "data"), stories=6, scenes=3, frames=17, height=32, width=32, seed=0)


def _golden(name: str) -> list[float]:
    return json.loads((ASSETS / f"{name}.json").read_text())["loss"]


def _worst(got: list[float], want: list[float]) -> float:
    assert len(got) == len(want)
    return max(abs(g - w) / abs(w) for g, w in zip(got, want, strict=True))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("golden")
    _dataset(root)
    return root


def test_pretrain_then_sft_match_the_golden_losses(workspace):
    pretrain = _losses(workspace, "pretrain", _run(workspace, "pretrain"))
    assert _worst(pretrain, _golden("local_pretrain")) < RTOL, pretrain
    checkpoint = workspace / "runs" / "pretrain" / f"checkpoint_{STEPS:08d}"
    sft_run = _run(workspace, "sft").model_copy(update={"init_from": str(checkpoint)})
    sft = _losses(workspace, "sft", sft_run)
    assert _worst(sft, _golden("local_sft")) < RTOL, sft


def test_a_broken_mask_misses_them(workspace):
    """`full` attention instead of the recipe's `v2`, every other setting the same."""
    run = _run(workspace, "pretrain", recipe__mask_policy="full")
    losses = _losses(workspace, "full", run)
    assert _worst(losses, _golden("local_pretrain")) > 10 * RTOL, losses


def _record() -> None:
    import datetime
    import tempfile

    with tempfile.TemporaryDirectory(prefix="m2d-golden-") as tmp:
        root = Path(tmp)
        _dataset(root)
        pretrain = _losses(root, "pretrain", _run(root, "pretrain"))
        checkpoint = root / "runs" / "pretrain" / f"checkpoint_{STEPS:08d}"
        sft_run = _run(root, "sft").model_copy(update={"init_from": str(checkpoint)})
        sft = _losses(root, "sft", sft_run)
        zero3 = _losses(root, "zero3", _run(root, "pretrain", deepspeed__zero_stage=3))
    ASSETS.mkdir(parents=True, exist_ok=True)
    recorded = datetime.date.today().isoformat()
    for name, losses in (("local_pretrain", pretrain), ("local_sft", sft)):
        record = {"recorded": recorded, "steps": STEPS, "loss": losses}
        (ASSETS / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"zero-3 vs zero-2 pretrain: worst relative difference {_worst(zero3, pretrain):.2e}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: test_golden_loss.py --record")
    _record()
