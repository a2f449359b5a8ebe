"""The console of a job the CLI runs: m2d's lines and progress shown, the rest in the log."""

from __future__ import annotations

import io
import json
import logging

import pytest

from infra import logging as m2d_logging
from orchestrator.console import JobConsole, m2d_message

RAY = "\x1b[36m(RayTrainWorker pid=8591)\x1b[0m "
CONTROLLER = "\x1b[36m(TrainController pid=8456)\x1b[0m "
STAMP = "2026-12-01 23:23:18,487"


def record(name: str, message: str, level: str = "INFO", rank: int | None = None) -> str:
    tag = f" [rank {rank}]" if rank is not None else ""
    return f"{STAMP} {level} m2d.{name}{tag}: {message}\n"


def progress(**fields) -> str:
    return CONTROLLER + record("progress", json.dumps(fields))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_records_are_recognised_in_the_shape_infra_logging_writes(caplog):
    """The console's pattern is checked against a record formatted by infra.logging itself."""
    logger = m2d_logging.get_logger("trainer.engine")
    handler = logging.getLogger("m2d").handlers[0]
    made = logging.LogRecord(logger.name, logging.WARNING, __file__, 1, "low memory", None, None)
    try:
        m2d_logging.set_rank(3)
        line = handler.format(made)
    finally:
        m2d_logging._rank = ""
    assert "m2d.trainer.engine [rank 3]: low memory" in line
    assert m2d_message(RAY + line) == ("WARNING", "low memory", None)
    assert m2d_message(handler.format(made)) == ("WARNING", "low memory", None)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (record("trainer.job", "MLflow run x"), ("INFO", "MLflow run x", None)),
        (RAY + record("trainer.engine", "engine up", rank=0), ("INFO", "engine up", None)),
        (RAY + record("trainer.loop", "rank 1 resumed", rank=1), None),  # rank 0 speaks
        (RAY + record("trainer.loop", "skipped", "WARNING", rank=1), ("WARNING", "skipped", None)),
        (progress(step=3, loss=1.5), ("INFO", "", {"step": 3, "loss": 1.5})),
        (RAY + "Reporting training result 1: TrainingReport(...)\n", None),
        (RAY + "[2026-12-01 23:23:16] [WARNING] [real_accelerator.py:213] CPU\n", None),
        ("2026-12-01 23:22:54,659\tINFO worker.py:2029 -- Started a local Ray instance\n", None),
        ("error: --out x exists; remove it\n", ("ERROR", "error: --out x exists; remove it", None)),
        (RAY + "error: not the job's own line\n", None),
        (record("progress", "{not json"), None),
    ],
)
def test_which_lines_are_m2ds(line, expected):
    assert m2d_message(line) == expected


def _feed_a_run(console: JobConsole, steps: int = 200, every: int = 50) -> None:
    console.feed(record("trainer.job", "MLflow run abc"), data=False)
    console.feed(RAY + "Setting accelerator to CPU\n", data=False)
    console.feed(
        RAY + record("progress", json.dumps({"event": "start", "step": 0, "steps": steps}), rank=0)
    )
    for step in range(1, steps + 1):
        console.feed(RAY + f"Reporting training result {step}: ...\n", data=True)
        console.feed(progress(step=step, loss=1.0, samples_per_s=2.0, checkpoint=step % every == 0))
    console.feed(f"run r finished: step {steps}/{steps}\n", data=True)


def test_a_plain_console_shows_m2ds_lines_and_progress_by_tenths(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    out, err = io.StringIO(), io.StringIO()
    console = JobConsole(tmp_path / "job.log", out=out, err=err)
    _feed_a_run(console)
    console.close()
    shown = err.getvalue().splitlines()
    assert shown[0] == "MLflow run abc"
    steps = [line.split()[1] for line in shown[1:]]
    # The first step, one line per tenth of the run, and one at each checkpoint.
    expected = sorted({1, *range(20, 201, 20), 50, 150})
    assert steps == [f"{n}/200" for n in expected], shown
    assert all("restarts 0" in line and "checkpoints" in line for line in shown[1:])
    assert "checkpoints 4" in shown[-1]
    assert out.getvalue() == "run r finished: step 200/200\n"  # data stays on stdout
    log = (tmp_path / "job.log").read_text()
    assert log.count("Reporting training result") == 200 and "Setting accelerator" in log


def test_every_checkpoint_and_every_restart_is_shown(tmp_path):
    err = io.StringIO()
    console = JobConsole(tmp_path / "job.log", out=io.StringIO(), err=err)
    start = json.dumps({"event": "start", "step": 0, "steps": 100})
    console.feed(RAY + record("progress", start, rank=0))
    console.feed(progress(step=3, loss=1.0, samples_per_s=2.0, checkpoint=True))
    restart = json.dumps({"event": "start", "step": 3, "steps": 100})
    console.feed(RAY + record("progress", restart, rank=0))
    console.feed(progress(step=5, loss=1.0, samples_per_s=2.0, checkpoint=True))
    console.close()
    lines = err.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["3/100", "5/100"]  # both checkpoints
    assert "checkpoints 1  restarts 0" in lines[0] and "checkpoints 2  restarts 1" in lines[1]


def test_verbose_shows_every_line(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    console = JobConsole(tmp_path / "job.log", verbose=True, out=out, err=err)
    _feed_a_run(console, steps=10, every=5)
    console.close()
    assert out.getvalue().count("Reporting training result") == 10
    assert "Setting accelerator" in err.getvalue()


def test_a_terminal_gets_a_live_display_unless_no_color(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    terminal = Terminal()
    live = JobConsole(tmp_path / "a.log", out=io.StringIO(), err=terminal)
    assert live.live
    _feed_a_run(live, steps=10, every=5)
    live.close()
    shown = terminal.getvalue()
    assert shown.startswith("MLflow run abc\n") and "\x1b[" in shown  # drawn, in colour
    assert "checkpoints 2  restarts 0" in shown.rsplit("\r", 1)[-1]  # its last state
    monkeypatch.setenv("NO_COLOR", "1")
    plain = Terminal()
    console = JobConsole(tmp_path / "b.log", out=io.StringIO(), err=plain)
    assert not console.live
    _feed_a_run(console, steps=10, every=5)
    console.close()
    assert "\x1b[" not in plain.getvalue()
    assert plain.getvalue().splitlines()[-1].startswith("step 10/10  loss 1.0000")


def test_the_log_is_named_once_when_a_line_is_first_kept_off_the_console(tmp_path):
    err = io.StringIO()
    console = JobConsole(tmp_path / "j.log", out=io.StringIO(), err=err, name_log_when_hiding=True)
    console.feed("error: --out x exists\n")
    assert err.getvalue() == "error: --out x exists\n"  # a refusal stays one line
    console.feed(RAY + "chatter\n")
    console.feed(RAY + "more chatter\n")
    console.close()
    assert err.getvalue().splitlines()[1:] == [
        f"log: {tmp_path / 'j.log'} (all output; m2d -v shows it here)"
    ]


def test_a_job_of_items_shows_items_done_of_all_with_the_last_one_and_an_eta(tmp_path):
    """The sampler's progress records (unit "item") go through the same display as
    training's: plain lines by tenths, naming the item, with no loss or checkpoints."""
    import logging

    err = io.StringIO()
    console = JobConsole(tmp_path / "job.log", out=io.StringIO(), err=err)
    record = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def emit(**fields):
        message = json.dumps(fields, separators=(",", ":"))
        made = logging.LogRecord("m2d.progress", logging.INFO, "", 0, message, None, None)
        console.feed(record.format(made))

    emit(event="start", step=0, steps=20, unit="item")
    for done in range(1, 21):
        emit(step=done, unit="item", item=f"ckpt/s{done:02d}/0")
    console.close()
    shown = err.getvalue().splitlines()
    assert [line.split()[:2] for line in shown] == [
        ["item", f"{n}/20"] for n in (1, *range(2, 21, 2))
    ], shown
    assert shown[-1].startswith("item 20/20  ckpt/s20/0  ETA ")
    assert not any("loss" in line or "checkpoints" in line for line in shown)
