"""``m2d data filter``: keep SFT windows whose adjacent scenes look alike (a Ray Data job).

The job is ``trainer.data.filter``, run as a subprocess: this module imports nothing
heavy, so ``m2d --help`` stays instant.
"""

from __future__ import annotations

import click

from infra.job_specs import FilterSpec, default_of
from orchestrator.jobs import make_spec, run_job


def _default(field: str):
    return default_of(FilterSpec, field)


@click.command("filter")
@click.option("--manifest", required=True, help="SFT manifest (.json/.jsonl), path or s3:// URI.")
@click.option(
    "--encoder", default=_default("encoder"), show_default=True, help="Registered video encoder."
)
@click.option(
    "--encoder-path", required=True, help="Encoder folder (save_pretrained), path or URI."
)
@click.option(
    "--out", required=True, help="Filtered manifest to write (.json/.jsonl); never overwritten."
)
@click.option(
    "--scenes", default=_default("scenes"), show_default=True, help="Scenes per SFT window (n)."
)
@click.option(
    "--threshold",
    default=_default("threshold"),
    show_default=True,
    help="Min adjacent-scene cosine similarity.",
)
@click.option(
    "--min-frames",
    default=_default("min_frames"),
    show_default=True,
    help="Skip shots with fewer frames.",
)
@click.option("--histogram", default=None, help="Histogram PNG [default: OUT with .png].")
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// paths.")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI: log counts and histogram.")
@click.option(
    "--experiment", default=_default("experiment"), show_default=True, help="MLflow experiment."
)
@click.option(
    "--num-actors",
    default=_default("num_actors"),
    show_default=True,
    help="Encoder actors (one model each).",
)
@click.option(
    "--batch-size", default=_default("batch_size"), show_default=True, help="Shots per actor batch."
)
def filter_(**options) -> None:
    """Embed every shot of an SFT manifest and keep the windows of similar scenes."""
    run_job("trainer.data.filter", make_spec(FilterSpec, **options))
