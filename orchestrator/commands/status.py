"""``m2d status | logs | stop | runs``: follow launches, local or on a Ray cluster."""

from __future__ import annotations

import asyncio
import time

import click

from orchestrator import runs, submit

_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED", "LOST")


def state_of(record: runs.RunRecord) -> str:
    """The run's state: Ray's job status for remote runs, the process's for local ones."""
    if record.kind == "local":
        return submit.local_state(record)
    return str(submit.remote_call(record, "get_job_status").value)


def latest_finished(cluster: str, stage: str) -> runs.RunRecord | None:
    """The newest successful (non-smoke) run of ``stage`` on ``cluster``, if any."""
    for record in runs.recent_records(limit=200):
        same = record.cluster == cluster and record.stage == stage and not record.smoke
        if same and state_of(record) == "SUCCEEDED":
            return record
    return None


def follow_remote_logs(record: runs.RunRecord) -> int:
    """Stream a remote job's logs until it ends; 0 if it succeeded."""

    async def stream() -> None:
        client = submit.job_client(record.address)
        async for chunk in client.tail_job_logs(record.ray_job):
            click.echo(chunk, nl=False)

    asyncio.run(stream())
    return 0 if state_of(record) == "SUCCEEDED" else 1


def _follow_local(record: runs.RunRecord) -> None:
    with open(record.log_path) as log:
        while True:
            line = log.readline()
            if line:
                click.echo(line, nl=False)
            elif submit.local_state(record) != "RUNNING":
                click.echo(log.read(), nl=False)
                return
            else:
                time.sleep(0.5)
                record = runs.load_record(record.name)


@click.command()
@click.argument("name")
def status(name: str) -> None:
    """State of run NAME, where it runs, and its latest checkpoint."""
    record = runs.load_record(name)
    found = runs.checkpoints(record)
    click.echo(f"run:        {record.name} ({record.stage} on {record.cluster})")
    click.echo(f"state:      {state_of(record)}")
    click.echo(f"where:      {record.address if record.kind == 'remote' else 'local process'}")
    click.echo(f"folder:     {record.run_dir}")
    click.echo(f"checkpoint: {found[-1] if found else 'none yet'}")


@click.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the run ends.")
def logs(name: str, follow: bool) -> None:
    """Print the output of run NAME."""
    record = runs.load_record(name)
    if record.kind == "remote":
        if follow:
            follow_remote_logs(record)
        else:
            click.echo(submit.remote_call(record, "get_job_logs"), nl=False)
        return
    if not record.log_path:
        raise click.ClickException(f"run {name} has no log yet")
    if follow:
        _follow_local(record)
    else:
        with open(record.log_path) as log:
            click.echo(log.read(), nl=False)


@click.command()
@click.argument("name")
def stop(name: str) -> None:
    """Stop run NAME (its checkpoints stay; resume with `m2d launch --resume NAME`)."""
    record = runs.load_record(name)
    if record.kind == "remote":
        stopped = submit.remote_call(record, "stop_job")
    else:
        stopped = submit.stop_local(record)
    click.echo(f"{name}: {'stopping' if stopped else 'was not running'}")


@click.command("runs")
@click.option("--limit", default=20, show_default=True, help="How many recent runs.")
def runs_(limit: int) -> None:
    """Table of recent runs: stage, cluster, state, checkpoints."""
    from rich.console import Console
    from rich.table import Table

    table = Table("run", "stage", "cluster", "state", "checkpoints", "latest checkpoint")
    for record in runs.recent_records(limit):
        try:
            state = state_of(record)
        except Exception as exc:  # one unreachable cluster must not hide the other runs
            state = f"unknown ({type(exc).__name__})"
        found = runs.checkpoints(record)
        latest = found[-1].rsplit("/", 1)[-1] if found else "-"
        table.add_row(record.name, record.stage, record.cluster, state, str(len(found)), latest)
    Console(width=160).print(table)
