"""`m2d logs RUN` (issue 29 point 4): m2d's own lines by default - its messages (rank 0's,
and any rank's warnings), progress as plain lines at every tenth and at checkpoints, what
the job printed - with --all for every line as written, --tail N, and -f that returns once
the run has ended."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator import runs
from orchestrator.cli import cli

STAMP = "2026-12-01 23:23:18,487"
WORKER = "\x1b[36m(RayTrainWorker pid=8591)\x1b[0m "
CONTROLLER = "\x1b[36m(TrainController pid=8456)\x1b[0m "


def _record(name: str, message: str, level: str = "INFO", rank: int | None = None) -> str:
    tag = f" [rank {rank}]" if rank is not None else ""
    return f"{STAMP} {level} m2d.{name}{tag}: {message}\n"


LOG = [
    f"{STAMP}\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled\n",
    _record("trainer.job", "MLflow run sqlite:///x run abc"),
    WORKER + _record("trainer.loop", "rank 0 of 2: node_rank 0", rank=0),
    WORKER + _record("trainer.loop", "rank 1 of 2: node_rank 0", rank=1),
    WORKER + "[2026-12-01 23:23:16,329] [WARNING] [real_accelerator.py:213] CPU\n",
    CONTROLLER + _record("progress", json.dumps({"event": "start", "step": 0, "steps": 10})),
    *(
        CONTROLLER
        + _record("progress", json.dumps({"step": s, "loss": 1.0 / s, "samples_per_s": 2}))
        for s in range(1, 11)
    ),
    WORKER + _record("trainer.checkpointing", "slow upload", "WARNING", rank=1),
    WORKER + "Reporting training result 1: TrainingReport(...)\n",
    "loss 1.0000 -> 0.1000 (0.10x): the mean of the first and last 20 steps\n",
    "run r1 finished: step 10/10, loss 0.1000\n",
]


@pytest.fixture
def finished(tmp_path, monkeypatch):
    monkeypatch.setenv("M2D_HOME", str(tmp_path / "home"))
    log = tmp_path / "r1.log"
    log.write_text("".join(LOG))
    record = runs.RunRecord(
        name="r1", cluster="local", stage="pretrain", run_dir=str(tmp_path / "runs" / "r1"),
        config_uri="", kind="local", exit_code=0, log_path=str(log),
    )  # fmt: skip
    record.save()
    return record


def _logs(*args: str) -> list[str]:
    done = CliRunner().invoke(cli, ["logs", "r1", *args])
    assert done.exit_code == 0, done.output
    return done.stdout.splitlines()


def test_the_default_shows_m2ds_lines_only(finished):
    assert _logs() == [
        "MLflow run sqlite:///x run abc",
        "rank 0 of 2: node_rank 0",  # rank 0 speaks for every rank
        *(f"step {s}/10  loss {1.0 / s:.4f}  2.00 samples/s  checkpoints 0  restarts 0"
          for s in range(1, 11)),  # every tenth: here every step
        "warning: slow upload",  # any rank's warning
        "loss 1.0000 -> 0.1000 (0.10x): the mean of the first and last 20 steps",
        "run r1 finished: step 10/10, loss 0.1000",
    ]  # fmt: skip


def test_all_is_every_line_as_written_and_tail_the_last_ones(finished):
    # Colour codes are dropped where stdout is no terminal (click.echo), as here.
    assert _logs("--all") == [re.sub(r"\x1b\[[0-9;]*m", "", line.rstrip("\n")) for line in LOG]
    assert _logs("--tail", "2") == _logs()[-2:]
    assert _logs("--all", "--tail", "1") == ["run r1 finished: step 10/10, loss 0.1000"]


def test_follow_of_an_ended_run_prints_it_and_returns(finished):
    assert _logs("-f") == _logs()


def test_a_run_without_a_log_says_so(finished, tmp_path):
    runs.RunRecord(
        name="r2", cluster="local", stage="pretrain", run_dir=str(tmp_path / "r2"),
        config_uri="", kind="local",
    ).save()  # fmt: skip
    done = CliRunner().invoke(cli, ["logs", "r2"])
    assert done.exit_code == 1 and "run r2 has no log yet" in done.output
    assert Path(finished.log_path).read_text() == "".join(LOG)  # a view writes nothing
