"""``m2d checkpoints RUN [--verify]``: a run's checkpoints, each complete or not and why.

A checkpoint is complete when its ``manifest.json`` (written last, once every rank's files
are on storage) is there and every file it lists is there at its size; ``--verify`` also
checks each file's sha256, reading every byte. Readers (SFT ``--from``, export,
sample-batch) use the newest complete one. Exit status 1 when a checkpoint's files differ
from its manifest (a save in progress, without one yet, is only listed).
"""

from __future__ import annotations

import click

from infra.checkpoint_layout import check_checkpoint
from orchestrator import runs


@click.command()
@click.argument("name")
@click.option("--verify", is_flag=True, help="Also check every file's sha256 (reads them all).")
def checkpoints(name: str, verify: bool) -> None:
    """List run NAME's checkpoints, oldest first, with their state."""
    record = runs.load_record(name)
    found = runs.checkpoints(record)
    if not found:
        click.echo(f"run {name} has no checkpoint yet ({record.run_dir})")
        return
    damaged = []
    for uri in found:
        state = check_checkpoint(uri, record.storage_config, verify=verify)
        folder = uri.rstrip("/").rsplit("/", 1)[-1]
        if state.complete:
            size = f"{state.total_bytes / 2**20:.1f} MiB"
            what = "verified" if verify else "complete"
            # The coordinator never wrote its manifest (a full disk then): the ranks' lists
            # of their files are what it was checked against.
            note = "" if state.manifest else "  (no manifest.json: checked by the ranks' lists)"
            click.echo(f"{folder}  {what:<10}  {size}{note}")
        else:
            click.echo(f"{folder}  incomplete  {state.problem}")
        if state.damaged:
            damaged.append(f"{folder} ({state.problem})")
    if damaged:
        # A save in progress has no manifest yet; files that no longer match theirs were
        # changed after the save: a reader skips such a checkpoint, a script must hear of it.
        raise click.ClickException(
            f"{len(damaged)} checkpoint(s) of {name} differ from their manifest: "
            f"{'; '.join(damaged)}"
        )
