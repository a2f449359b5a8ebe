"""``m2d checkpoints RUN [--verify]``: a run's checkpoints, each complete or not and why.

A checkpoint is complete when its ``manifest.json`` (written last, once every rank's files
are on storage) is there and every file it lists is there at its size; ``--verify`` also
checks each file's sha256, reading every byte. Readers (SFT ``--from``, export,
sample-batch) use the newest complete one. Exit status 1 when a checkpoint's files differ
from its manifest (a save in progress, without one yet, is only listed).
"""

from __future__ import annotations

import click

from infra.checkpoint_layout import CheckpointState, check_checkpoint
from orchestrator import runs
from orchestrator.completion import run_names
from orchestrator.output import print_json


@click.command()
@click.argument("name", shell_complete=run_names)
@click.option("--verify", is_flag=True, help="Also check every file's sha256 (reads them all).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array instead.")
def checkpoints(name: str, verify: bool, as_json: bool) -> None:
    """List run NAME's checkpoints, oldest first, with their state.

    --json: an array, oldest first, of objects with checkpoint (its folder name), uri,
    state ("complete", "verified" or "incomplete"), bytes, manifest (whether its manifest
    was written), damaged (its files differ from that manifest) and problem (null when
    complete).
    """
    record = runs.load_record(name)
    found = runs.checkpoints(record)
    states = [check_checkpoint(uri, record.storage_config, verify=verify) for uri in found]
    rows = [_row(state, verify) for state in states]
    if as_json:
        print_json(rows)
    elif not found:
        click.echo(f"run {name} has no checkpoint yet ({record.run_dir})")
    else:
        click.echo(f"{'checkpoint':<{_width(rows)}}  {'state':<10}  size / problem")
        for row in rows:
            click.echo(_line(row, _width(rows)))
    damaged = [f"{row['checkpoint']} ({row['problem']})" for row in rows if row["damaged"]]
    if damaged:
        # A save in progress has no manifest yet; files that no longer match theirs were
        # changed after the save: a reader skips such a checkpoint, a script must hear of it.
        raise click.ClickException(
            f"{len(damaged)} checkpoint(s) of {name} differ from their manifest: "
            f"{'; '.join(damaged)}"
        )


def _row(state: CheckpointState, verify: bool) -> dict:
    state_name = ("verified" if verify else "complete") if state.complete else "incomplete"
    return {
        "checkpoint": state.uri.rstrip("/").rsplit("/", 1)[-1],
        "uri": state.uri,
        "state": state_name,
        "bytes": state.total_bytes,
        "manifest": state.manifest,
        "damaged": state.damaged,
        "problem": state.problem,
    }


def _width(rows: list[dict]) -> int:
    return max(len("checkpoint"), *(len(row["checkpoint"]) for row in rows))


def _line(row: dict, width: int) -> str:
    if row["problem"] is not None:
        return f"{row['checkpoint']:<{width}}  incomplete  {row['problem']}"
    # The coordinator never wrote its manifest (a full disk then): the ranks' lists of
    # their files are what it was checked against.
    note = "" if row["manifest"] else "  (no manifest.json: checked by the ranks' lists)"
    return f"{row['checkpoint']:<{width}}  {row['state']:<10}  {row['bytes'] / 2**20:.1f} MiB{note}"
