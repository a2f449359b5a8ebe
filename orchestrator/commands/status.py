"""``m2d status | logs | stop | runs``: follow launches, local or on a Ray cluster."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import click

from infra.checkpoint_layout import check_checkpoint, complete_checkpoint
from orchestrator import ray_jobs, runs, submit
from orchestrator.cli import UserError
from orchestrator.completion import run_names
from orchestrator.console import JobConsole
from orchestrator.output import print_json, print_table

_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED", "LOST")


@dataclass
class Progress:
    """Where a run's MLflow run stands: its URL and the latest step and loss logged."""

    url: str
    step: int | None
    loss: float | None


def progress_of(records: list[runs.RunRecord]) -> dict[str, Progress]:
    """Each run's MLflow progress, by run name; runs without one are left out. One try per
    tracking store: a store that does not answer is skipped for the remaining runs."""
    from infra.tracking import Tracker, fail_fast, run_id_in, store_exists

    found: dict[str, Progress] = {}
    silent: set[str] = set()
    with fail_fast(timeout_s=5):
        for record in records:
            uri = record.tracking_uri
            if not uri or uri in silent or not store_exists(uri):
                continue
            try:
                run_id = run_id_in(record.run_dir, record.storage_config)
            except OSError:  # the run folder cannot be read from here
                continue
            if run_id is None:
                continue
            try:
                url, metrics = Tracker(uri, run_id).latest()
                step = metrics.get("step")
                found[record.name] = Progress(
                    url, None if step is None else int(step), metrics.get("loss")
                )
            except Exception as exc:  # MLflow, requests and SQLAlchemy each raise their own
                if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    silent.add(uri)
    return found


@click.command()
@click.argument("name", shell_complete=run_names)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead.")
def status(name: str, as_json: bool) -> None:
    """State of run NAME, where it runs, its progress and its last complete checkpoint.

    --json fields: name, stage, cluster, state (SUCCEEDED, RUNNING, FAILED, STOPPED, LOST or
    Ray's job status; "unknown" when it cannot be read), exit_code, where ("local" or the
    Ray address), folder,
    step, loss, mlflow (the run's URL), checkpoint (the last complete one's URI), incomplete
    (each newer checkpoint: checkpoint, problem); null where unknown.
    """
    record = runs.load_record(name)
    found = runs.checkpoints(record)
    progress = progress_of([record]).get(record.name)
    if as_json:
        print_json(_status_document(record, found, progress))
        return
    click.echo(f"run:        {record.name} ({record.stage} on {record.cluster})")
    click.echo(f"state:      {runs.state_of(record)}")
    click.echo(f"where:      {record.address if record.kind == 'remote' else 'local process'}")
    click.echo(f"folder:     {record.run_dir}")
    if progress is not None:
        click.echo(f"step:       {_step(progress)}, loss {_loss(progress)}")
        click.echo(f"mlflow:     {progress.url}")
    elif record.tracking_uri:
        click.echo(f"mlflow:     no run of it readable in {record.tracking_uri} from here")
    click.echo(f"checkpoint: {_last_complete(record, found)}")


def _last_complete(record: runs.RunRecord, found: list[str]) -> str:
    """The run's newest complete checkpoint (what a resume, SFT --from, export and
    sample-batch take) and what is wrong with each newer one."""
    if not found:
        return "none yet"
    chosen, states = _complete_and_newer(record, found)
    if chosen is None:
        return f"none complete ({len(found)} incomplete: `m2d checkpoints {record.name}`)"
    notes = "".join(
        f"; {state.uri.rsplit('/', 1)[-1]} is incomplete ({state.problem})" for state in states
    )
    return f"{chosen} (last complete{notes})"


def _complete_and_newer(record: runs.RunRecord, found: list[str]) -> tuple[str | None, list]:
    """The newest complete checkpoint of ``found`` (None: none is) and the states of the
    incomplete ones after it (all of them when none is complete)."""
    chosen = complete_checkpoint(found, record.storage_config, lambda line: None)
    newer = found[found.index(chosen) + 1 :] if chosen else found
    return chosen, [check_checkpoint(uri, record.storage_config) for uri in newer]


def _state_fields(state: str, exit_code: int | None) -> dict[str, Any]:
    """A state as JSON: the word alone ("FAILED", not "FAILED (exit 1)"; "unknown" where the
    cluster did not answer), and the local job's exit status (null: not ended, or remote)."""
    return {"state": state.split(" ", 1)[0], "exit_code": exit_code}


def _status_document(
    record: runs.RunRecord, found: list[str], progress: Progress | None
) -> dict[str, Any]:
    chosen, newer = _complete_and_newer(record, found) if found else (None, [])
    return {
        "name": record.name,
        "stage": record.stage,
        "cluster": record.cluster,
        **_state_fields(runs.state_of(record), record.exit_code),
        "where": record.address if record.kind == "remote" else "local",
        "folder": record.run_dir,
        "step": None if progress is None else progress.step,
        "loss": None if progress is None else progress.loss,
        "mlflow": None if progress is None else progress.url,
        "checkpoint": chosen,
        "incomplete": [{"checkpoint": s.uri, "problem": s.problem} for s in newer],
    }


@click.command()
@click.argument("name", shell_complete=run_names)
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the run ends.")
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Every line the job printed (Ray's, DeepSpeed's, every rank's), as it printed it.",
)
@click.option("--tail", type=click.IntRange(min=1), help="Only the last N lines (then -f goes on).")
def logs(name: str, follow: bool, everything: bool, tail: int | None) -> None:
    """Print the output of run NAME: m2d's own lines (its messages, warnings and errors,
    progress at every tenth of the run and at each checkpoint, what the job printed),
    or with --all every line of its log."""
    record = runs.load_record(name)
    view = LogView(everything)
    if record.kind == "remote":
        text = ray_jobs.remote_call(record, "get_job_logs")
    elif not record.log_path:
        raise click.ClickException(f"run {name} has no log yet")
    else:
        with open(record.log_path) as log:
            text = log.read()
    shown = view.lines(text.splitlines(keepends=True))
    for line in shown[-tail:] if tail else shown:
        click.echo(line)
    if follow:
        view.follow(record, len(text))


class LogView:
    """A job's log as `m2d logs` shows it: through the console's filter (m2d's lines, plain
    progress lines), or whole with ``everything``."""

    def __init__(self, everything: bool) -> None:
        self.everything = everything
        self.shown: list[str] = []
        self.console = JobConsole(None, out=self, err=self)

    def write(self, text: str) -> None:  # the console's stream: collect what it shows
        self.shown.extend(text.splitlines())

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def lines(self, raw: list[str]) -> list[str]:
        """What ``raw`` (lines of the log, in order) shows as."""
        if self.everything:
            return [line.rstrip("\n") for line in raw]
        self.shown = []
        for line in raw:
            self.console.feed(line, data=is_job_output(line))
        return self.shown

    def follow(self, record: runs.RunRecord, offset: int) -> None:
        """Print what the log gains after ``offset`` characters until the run ends."""
        if record.kind == "remote":
            pending = [""]

            def echo(chunk: str) -> None:  # whole lines only: a chunk may end mid-line
                nonlocal offset
                skipped = chunk[:offset]  # Ray streams the log from its start
                chunk, offset = chunk[len(skipped) :], offset - len(skipped)
                *complete, pending[0] = (pending[0] + chunk).split("\n")
                for line in self.lines([f"{line}\n" for line in complete]):
                    click.echo(line)

            submit.follow_remote_logs(record, echo)
            for line in self.lines([pending[0]] if pending[0] else []):
                click.echo(line)
            return
        with open(record.log_path) as log:
            log.seek(offset)
            while True:
                line = log.readline()
                if line:
                    for shown in self.lines([line]):
                        click.echo(shown)
                elif runs.local_state(record) != "RUNNING":
                    for shown in self.lines(log.readlines()):
                        click.echo(shown)
                    return
                else:
                    time.sleep(0.5)
                    record = runs.load_record(record.name)


def is_job_output(line: str) -> bool:
    """Whether a log line is what the job itself printed (its data and closing words),
    not a log record of Ray, DeepSpeed or a worker: no Ray prefix, no timestamp."""
    return not re.match(r"^(\x1b\[[0-9;]*m)*(\(|\[?\d{4}-\d\d-\d\d)", line)


@click.command()
@click.argument("name", shell_complete=run_names)
def stop(name: str) -> None:
    """Stop run NAME (its checkpoints stay; resume with `m2d launch --resume NAME`)."""
    record = runs.load_record(name)
    if record.kind == "remote":
        stopped = ray_jobs.remote_call(record, "stop_job")
    else:
        stopped = submit.stop_local(record)
    click.echo(f"{name}: {'stopping' if stopped else 'was not running'}")


@click.group("runs", invoke_without_command=True)
@click.option("--limit", default=20, show_default=True, help="How many recent runs.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array instead.")
@click.pass_context
def runs_(ctx: click.Context, limit: int, as_json: bool) -> None:
    """Table of recent runs: stage, cluster, state, step, last loss, checkpoints.

    --json: an array, newest first, of objects with name, stage, cluster, state and
    exit_code (as `m2d status --json`), step, loss, checkpoints (how many), checkpoint (the
    last complete one's URI), folder and mlflow (the run's URL); null where unknown.
    """
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    records = runs.recent_records(limit, warn=lambda line: click.echo(line, err=True))
    progress = progress_of(records)
    rows = [_run_row(record, progress.get(record.name)) for record in records]
    if as_json:
        print_json([{**row, **_state_fields(row["state"], row["exit_code"])} for row in rows])
        return
    table = Table("run", "stage", "cluster", "state", "step", "loss", "checkpoints", "complete")
    for row in rows:
        table.add_row(
            row["name"],
            row["stage"],
            row["cluster"],
            row["state"],
            "-" if row["step"] is None else str(row["step"]),
            "-" if row["loss"] is None else f"{row['loss']:.4f}",
            str(row["checkpoints"]),
            row["checkpoint"].rsplit("/", 1)[-1] if row["checkpoint"] else "-",
        )
    print_table(table)


def _run_row(record: runs.RunRecord, seen: Progress | None) -> dict[str, Any]:
    """One run as `m2d runs` lists it."""
    try:
        state = runs.state_of(record)
    except Exception as exc:  # one unreachable cluster must not hide the other runs
        state = f"unknown ({type(exc).__name__})"
    found = runs.checkpoints(record)
    return {
        "name": record.name,
        "stage": record.stage,
        "cluster": record.cluster,
        "state": state,  # the table's: "FAILED (exit 1)", "unknown (ServiceError)"
        "exit_code": record.exit_code,
        "step": None if seen is None else seen.step,
        "loss": None if seen is None else seen.loss,
        "checkpoints": len(found),
        "checkpoint": complete_checkpoint(found, record.storage_config, lambda line: None),
        "folder": record.run_dir,
        "mlflow": None if seen is None else seen.url,
    }


def _step(progress: Progress | None) -> str:
    return "-" if progress is None or progress.step is None else str(progress.step)


def _loss(progress: Progress | None) -> str:
    return "-" if progress is None or progress.loss is None else f"{progress.loss:.4f}"


@runs_.command("sync")
@click.argument("name", shell_complete=run_names)
def sync(name: str) -> None:
    """Send run NAME's metrics that MLflow did not take while the job ran (kept in its
    folder's mlflow_pending.jsonl); a step MLflow already has is not sent again."""
    from infra.errors import first_line
    from infra.tracking import PENDING_METRICS, fail_fast, replay_pending, run_id_in

    record = runs.load_record(name)
    storage = record.storage_config
    run_id = run_id_in(record.run_dir, storage)
    if not record.tracking_uri or not run_id:
        raise UserError(f"run {name} has no MLflow run to send metrics to")
    try:
        with fail_fast(30, retries=2):
            sent = replay_pending(record.run_dir, storage, record.tracking_uri, run_id)
    except Exception as exc:  # MlflowException, requests' errors...
        raise UserError(
            f"MLflow at {record.tracking_uri} did not take the metrics "
            f"({type(exc).__name__}: {first_line(exc, 200)}); "
            f"they stay in {record.run_dir}/{PENDING_METRICS} - try again once it answers"
        ) from None
    click.echo(
        f"{name}: {sent} metric value(s) sent to MLflow" if sent else f"{name}: nothing to send"
    )
