"""``m2d launch``: resolve a cluster profile and a stage recipe into a run and submit it."""

from __future__ import annotations

import json
import os

import click
import yaml

from infra.config import STAGES, RunConfig, looks_secret
from infra.deepspeed_config import deepspeed_config
from orchestrator import profiles

# Credentials the workers read from their own environment, never from config.
CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)


def credential_status() -> dict[str, str]:
    """Which credential variables are set here: names only, never values."""
    names = {*CREDENTIAL_VARS, *(name for name in os.environ if looks_secret(name))}
    relevant = sorted(name for name in names if name.startswith(("AWS_", "MLFLOW_")))
    return {name: "set" if os.environ.get(name) else "unset" for name in relevant}


def render_dry_run(run: RunConfig) -> str:
    """The resolved run config and its DeepSpeed JSON, as --dry-run prints them."""
    parts = [
        "# Resolved run configuration (nothing submitted)",
        yaml.safe_dump(run.model_dump(mode="json"), sort_keys=False).rstrip(),
        "# Credentials (read from the environment of each process; values never shown)",
        yaml.safe_dump({"credentials": credential_status()}, sort_keys=False).rstrip(),
        "# DeepSpeed config",
        json.dumps(deepspeed_config(run), indent=2),
    ]
    return "\n".join(parts) + "\n"


@click.command()
@click.option("--cluster", "cluster_name", required=True, help="Profile name in clusters/.")
@click.option("--stage", type=click.Choice(STAGES), required=True, help="Training stage.")
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="KEY.PATH=VALUE",
    help="Override one resolved key, e.g. recipe.steps=200 or deepspeed.zero_stage=3.",
)
@click.option("--dry-run", is_flag=True, help="Print the resolved run and DeepSpeed JSON only.")
@click.pass_context
def launch(
    ctx: click.Context, cluster_name: str, stage: str, assignments: tuple[str, ...], dry_run: bool
) -> None:
    """Launch STAGE (pretrain or sft) on cluster CLUSTER."""
    directory = profiles.clusters_dir(ctx.find_root().obj["clusters_dir"])
    loaded = profiles.load_profile(profiles.find_profile(cluster_name, directory))
    run = profiles.resolve(loaded, stage, profiles.parse_overrides(assignments))
    if dry_run:
        click.echo(render_dry_run(run), nl=False)
        return
    raise click.ClickException(
        "submitting training jobs is not built yet (issue 5: the Ray Train + DeepSpeed job); "
        "use --dry-run to see the resolved run"
    )
