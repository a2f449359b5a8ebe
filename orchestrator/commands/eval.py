"""``m2d eval``: score the stories a sample-batch job rendered (``sampler.eval_job``).

The job runs here (embedded ``local`` Ray) or on the profile's Ray cluster, like
sample-batch; the orchestrator never imports the encoders (or torch).
"""

from __future__ import annotations

from pathlib import Path

import click

from infra.job_specs import EvalSpec
from infra.storage import is_remote
from orchestrator import runs, submit
from orchestrator.cli import set_option
from orchestrator.jobs import make_spec, spec_options

JOB_MODULE = "sampler.eval_job"


@click.command("eval")
@click.option("--cluster", "cluster_name", required=True, help="Profile name in clusters/.")
@click.option("--samples", required=True, help="The --out folder of `m2d sample-batch`.")
@spec_options(EvalSpec, "encoder", "encoder_path", "overwrite", "seed")
@click.option("--num-actors", type=int, help="Encoder actors [default: the profile's workers].")
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")
@set_option("ray.address=http://HOST:8265")
@click.pass_context
def eval_(
    ctx: click.Context,
    cluster_name: str,
    samples: str,
    num_actors: int | None,
    no_tracking: bool,
    assignments: tuple[str, ...],
    **options,
) -> None:
    """Score every sampled story with the paper's consistency metrics; metrics.json and
    stories.csv per checkpoint next to the samples, and the metrics in MLflow at each
    checkpoint's training step."""
    run = runs.resolve_run(ctx.find_root().obj["clusters_dir"], cluster_name, "sft", assignments)
    workers = run.workers
    path = options.pop("encoder_path")
    spec = make_spec(
        EvalSpec,
        samples=samples if is_remote(samples) else str(Path(samples).expanduser().resolve()),
        encoder_path=path if is_remote(path) else str(Path(path).expanduser().resolve()),
        num_actors=num_actors or workers.num_workers,
        cpus_per_actor=workers.cpus_per_worker,
        gpus_per_actor=workers.gpus_per_worker,
        storage=run.storage,
        tracking=None if no_tracking else run.tracking,
        **options,
    )
    submit.run_job_on(run, JOB_MODULE, spec, "eval")
