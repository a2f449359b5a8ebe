"""``m2d export``: a run's checkpoint as a diffusers transformer folder."""

from __future__ import annotations

import click

from infra.job_specs import ExportSpec
from orchestrator import runs
from orchestrator.completion import run_names
from orchestrator.jobs import make_spec, run_here

EXPORT_MODULE = "trainer.export"


def pick_checkpoint(record: runs.RunRecord, step: int | None) -> str:
    """The latest complete checkpoint, or the one taken at ``step``."""
    if step is None:
        return runs.latest_checkpoint(record)
    return runs.checkpoint_at(record, step)


@click.command()
@click.argument("name", shell_complete=run_names)
@click.option("--step", type=int, help="Checkpoint step (default: the latest).")
@click.option("--out", required=True, help="New folder or s3:// URI.")
def export(name: str, step: int | None, out: str) -> None:
    """Write run NAME's transformer as a diffusers folder (stock from_pretrained loads it)."""
    record = runs.load_record(name)
    checkpoint = pick_checkpoint(record, step)
    spec = make_spec(ExportSpec, checkpoint=checkpoint, out=out, storage=record.storage_config)
    run_here(EXPORT_MODULE, spec)
