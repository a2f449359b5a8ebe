"""``m2d launch --smoke``: the real job on the target cluster, tiny, before the real run.

Each stage is checked in its own run folder (named ``{cluster}-{stage}-smoke-{UTC time}``,
so nothing a user made is touched): *train* SMOKE_STEPS steps at 9 frames and 16x16
pixels (the VAE's 8x times the patch's 2x) with short captions; *checkpoint* - the run
saved one at that step; *resume* - the same run started again for SMOKE_STEPS more steps
continues from it (the checkpoint has the new step, the same MLflow run, and each step
is in MLflow once: a run that started over would log the first steps twice). A pretrain
smoke run is followed by an SFT one initialised from its checkpoint, whose MLflow run must
also name the pretrain's as the run it started from.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from infra.config import RunConfig, deep_merge
from infra.errors import DataError
from infra.run_folder import TrainerState, read_trainer_state, write_run_config
from infra.storage import join
from orchestrator import ray_jobs, runs, submit

SMOKE_STEPS = 2


@dataclass
class Check:
    """One row of the smoke table."""

    stage: str
    name: str
    ok: bool
    detail: str


def shrink(run: RunConfig, steps: int = SMOKE_STEPS) -> RunConfig:
    """``run`` at smoke size: 9 frames of 16x16 per scene, 8 text tokens, ``steps`` steps,
    a checkpoint every SMOKE_STEPS, no automatic restarts."""
    overrides = {
        "recipe": {"steps": steps, "frames": 9, "height": 16, "width": 16, "warmup_steps": 0},
        "model": {"text_tokens": 8},
        "fault_tolerance": {
            "checkpoint_every": SMOKE_STEPS,
            "keep_checkpoints": 2,
            "max_failures": 0,
        },
    }
    return RunConfig.model_validate(deep_merge(run.model_dump(mode="json"), overrides))


def smoke_name(run: RunConfig) -> str:
    return f"{run.cluster}-{run.stage}-smoke-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


Start = Callable[[runs.RunRecord, RunConfig, str], int]


def check_stage(record: runs.RunRecord, run: RunConfig, start: Start) -> list[Check]:
    """Train, checkpoint, resume ``run`` (already shrunk) in ``record``'s folder."""
    stage, checks = run.stage, []
    code = start(record, run, record.name)
    checks.append(Check(stage, "train", code == 0, f"{SMOKE_STEPS} steps, exit {code}"))
    first = _checkpoint_state(record, SMOKE_STEPS)
    checks.append(Check(stage, "checkpoint", first is not None, _where(record, SMOKE_STEPS, first)))
    if not (code == 0 and first):
        checks.append(Check(stage, "resume", False, "not run: no checkpoint to resume from"))
        return checks
    longer = shrink(run, 2 * SMOKE_STEPS)
    write_run_config(record.config_folder, record.storage_config, longer)  # the resume runs more
    code = start(record, longer, f"{record.name}-resume")
    checks.append(Check(stage, "resume", *_resumed(record, run, code, first)))
    return checks


def _resumed(
    record: runs.RunRecord, run: RunConfig, code: int, first: TrainerState
) -> tuple[bool, str]:
    if code:
        return False, f"exit {code}"
    second = _checkpoint_state(record, 2 * SMOKE_STEPS)
    if second is None:
        return False, f"no checkpoint at step {2 * SMOKE_STEPS}"
    run_id = first.mlflow_run_id
    if second.mlflow_run_id != run_id:
        return False, f"new MLflow run {second.mlflow_run_id} (was {run_id})"
    try:
        steps = sorted(m.step for m in _client(run).get_metric_history(run_id, "loss"))
    except Exception as exc:  # MLflow raises many kinds; the row says which
        return False, f"cannot read MLflow run {run_id}: {type(exc).__name__}"
    wanted = list(range(1, 2 * SMOKE_STEPS + 1))
    if steps != wanted:
        return False, f"MLflow loss steps {steps}, wanted {wanted} (started over?)"
    return True, f"step {SMOKE_STEPS} -> {2 * SMOKE_STEPS}, MLflow run {run_id}"


def check_linked(sft: runs.RunRecord, pretrain: runs.RunRecord, run: RunConfig) -> Check:
    """The SFT run's MLflow run names the pretrain's as the run it started from."""
    parent = getattr(_checkpoint_state(pretrain, 2 * SMOKE_STEPS), "mlflow_run_id", None)
    child = getattr(_checkpoint_state(sft, SMOKE_STEPS), "mlflow_run_id", None)
    if not (parent and child):
        return Check("sft", "linked", False, "a run has no MLflow id")
    try:
        tags = _client(run).get_run(child).data.tags
    except Exception as exc:
        return Check("sft", "linked", False, f"cannot read run {child}: {exc}")
    from infra.tracking import STARTED_FROM

    got = tags.get(STARTED_FROM)
    return Check("sft", "linked", got == parent, f"parent {got}, pretrain {parent}")


def _client(run: RunConfig):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=run.tracking.uri)


def _checkpoint_state(record: runs.RunRecord, step: int) -> TrainerState | None:
    """The trainer state of the run's checkpoint at ``step``, if it is there."""
    uri = join(record.run_dir, f"checkpoint_{step:08d}")
    try:
        state = read_trainer_state(uri, record.storage_config)
    except DataError:
        return None
    return state if state.step == step else None


def _where(record: runs.RunRecord, step: int, state: TrainerState | None) -> str:
    name = f"checkpoint_{step:08d}"
    return join(record.run_dir, name) if state else f"no {name} in {record.run_dir}"


def run_to_end(record: runs.RunRecord, run: RunConfig, job_id: str, echo) -> int:
    """Run the job to its end, locally (its console: m2d's lines and progress) or as a Ray
    job named ``job_id`` (the tail of its log through ``echo`` when it fails); its exit
    status."""
    if record.kind == "local":
        return submit.run_local(record)
    submit.submit_remote(record, run, submission_id=job_id)
    client = ray_jobs.job_client(record.address)
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    if status != "SUCCEEDED":
        for line in client.get_job_logs(job_id).strip().splitlines()[-20:]:
            echo(line + "\n")
    return 0 if status == "SUCCEEDED" else 1


def render(checks: list[Check]) -> str:
    """The pass/fail table."""
    rows = [("stage", "check", "result", "detail")]
    rows += [(c.stage, c.name, "PASS" if c.ok else "FAIL", c.detail) for c in checks]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
        for row in rows
    ]
    return "\n".join(lines) + "\n"
