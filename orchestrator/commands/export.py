"""``m2d export``: a run's checkpoint as a diffusers transformer folder."""

from __future__ import annotations

import json
import subprocess
import sys

import click

from infra.errors import ConfigError
from orchestrator import runs

EXPORT_MODULE = "trainer.export"


def pick_checkpoint(record: runs.RunRecord, step: int | None) -> str:
    """The latest checkpoint, or the one taken at ``step``."""
    if step is None:
        return runs.latest_checkpoint(record)
    found = {runs.checkpoint_step(c, record): c for c in runs.checkpoints(record)}
    if step not in found:
        steps = ", ".join(str(s) for s in sorted(s for s in found if s is not None)) or "none"
        raise ConfigError(f"run {record.name} has no checkpoint at step {step} (has: {steps})")
    return found[step]


@click.command()
@click.argument("name")
@click.option("--step", type=int, help="Checkpoint step (default: the latest).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New folder.")
def export(name: str, step: int | None, out: str) -> None:
    """Write run NAME's transformer as a diffusers folder (stock from_pretrained loads it)."""
    record = runs.load_record(name)
    checkpoint = pick_checkpoint(record, step)
    command = [sys.executable, "-m", EXPORT_MODULE, "--checkpoint", checkpoint, "--out", out]
    if record.storage:
        command += ["--storage-json", json.dumps(record.storage)]
    code = subprocess.call(command)
    if code:
        raise click.exceptions.Exit(code)
