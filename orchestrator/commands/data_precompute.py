"""``m2d data precompute``: encode a stage's clips and captions once, for training to read.

The job's spec carries the stage's resolved run (profile + stage recipe + ``--set``): the
model, the recipe's frames/size/scenes/seed, precision, workers, storage and MLflow; the
work runs in ``datajobs.precompute`` as a subprocess (the orchestrator imports neither
torch nor Ray). Set ``data.<stage>_latents`` to the
output (in the profile or with ``m2d launch --set``) to train from it.
"""

from __future__ import annotations

import os

import click

from infra.config import STAGES, RunConfig, TrackingConfig
from infra.job_specs import PrecomputeSpec, default_of
from orchestrator import runs
from orchestrator.cli import set_option
from orchestrator.completion import cluster_option
from orchestrator.jobs import make_spec, run_here, spec_options


@click.command()
@cluster_option(default="local", show_default=True, help="Profile.")
@click.option("--stage", type=click.Choice(STAGES), required=True, help="Recipe to encode for.")
@click.option("--out", required=True, help="Output folder or s3:// prefix (new, or this job's).")
@click.option("--manifest", default=None, help="Manifest [default: the profile's data.STAGE].")
@spec_options(PrecomputeSpec, "shard_size", "num_actors")
@set_option("data.prefetch=4")
@click.option("--no-tracking", is_flag=True, help="Do not log the counts to MLflow.")
@click.pass_context
def precompute(
    ctx, cluster_name, stage, out, manifest, shard_size, num_actors, assignments, no_tracking
) -> None:
    """Write VAE latents and T5 embeddings of every clip (SFT: every shot) to --out.

    Idempotent: rerun the same command to resume a killed job; finished shards are kept.
    """
    run = runs.resolve_run(ctx.find_root().obj["clusters_dir"], cluster_name, stage, assignments)
    manifest = manifest or getattr(run.data, stage)
    if not manifest:
        raise click.UsageError(f"give --manifest (the profile {cluster_name} sets no data.{stage})")
    tracking = None if no_tracking else run.tracking
    spec = job_spec(run, manifest, out, shard_size, num_actors, tracking=tracking)
    run_here("datajobs.precompute", spec)
    where = out if "://" in out else os.path.abspath(out)  # workers may start elsewhere
    click.echo(
        f"train from it: m2d launch --cluster {cluster_name} --stage {stage} "
        f"--set data.{stage}_latents={where}"
    )


def job_spec(
    run: RunConfig,
    manifest: str,
    out: str,
    shard_size: int = default_of(PrecomputeSpec, "shard_size"),
    num_actors: int | None = None,
    tracking: TrackingConfig | None = None,
) -> PrecomputeSpec:
    """The job's spec: the stage's resolved run, the manifest and the output; ``tracking``
    (the run's, unless --no-tracking) where the counts are logged."""
    return make_spec(
        PrecomputeSpec,
        run=run,
        manifest=manifest,
        out=out,
        shard_size=shard_size,
        num_actors=num_actors,
        tracking=tracking,
    )
