"""``m2d plan``: memory per GPU, step time and cost of a stage, before renting the cluster.

Reads the profile, the stage recipe and the three ``config.json`` files of
``model.source`` (never weights, data or a service); docs/planner.md gives the formulas.
"""

from __future__ import annotations

import json

import click

from infra.config import STAGES
from orchestrator import runs
from orchestrator.cli import set_option
from orchestrator.completion import cluster_option


@click.command()
@cluster_option(required=True, help="Cluster profile name.")
@click.option("--stage", type=click.Choice(STAGES), required=True, help="Training stage.")
@set_option("deepspeed.zero_stage=3 or workers.nodes=16")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead.")
@click.pass_context
def plan(ctx, cluster_name: str, stage: str, assignments: tuple[str, ...], as_json: bool) -> None:
    """Whether a stage fits the cluster's GPUs, how long it takes and what it costs."""
    from orchestrator.plan import plan_for, report

    run = runs.resolve_run(ctx.find_root().obj["clusters_dir"], cluster_name, stage, assignments)
    found = plan_for(run, warn=lambda line: click.echo(line, err=True))
    click.echo(json.dumps(report.as_json(found)) if as_json else report.as_table(found), nl=as_json)
