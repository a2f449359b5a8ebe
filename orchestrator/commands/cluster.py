"""``m2d cluster``: list, show, validate cluster profiles and export their JSON schema."""

from __future__ import annotations

import json
from pathlib import Path

import click
import yaml

from infra.config import STAGES, ClusterProfile
from infra.errors import ConfigError
from orchestrator import profiles


def profile_schema() -> str:
    """The JSON schema of a cluster profile, as written to ``clusters/schema.json``."""
    schema = ClusterProfile.model_json_schema()
    schema["title"] = "m2d cluster profile"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def _directory(ctx: click.Context) -> Path:
    return profiles.clusters_dir(ctx.find_root().obj["clusters_dir"])


def check(loaded: profiles.LoadedProfile) -> None:
    """Validate both stages of a profile; raises ConfigError naming file, line and key."""
    for stage in STAGES:
        profiles.resolve(loaded, stage, {})


@click.group()
def cluster() -> None:
    """List, show and validate cluster profiles (clusters/*.yaml)."""


@cluster.command("list")
@click.pass_context
def list_(ctx: click.Context) -> None:
    """Table of the profiles: name, workers, GPUs, Ray address, whether each is valid."""
    from rich.console import Console
    from rich.table import Table

    table = Table("cluster", "workers", "gpu", "ray", "status", "description")
    for path in profiles.profile_paths(_directory(ctx)):
        try:
            loaded = profiles.load_profile(path)
            check(loaded)
        except ConfigError as exc:
            table.add_row(path.stem, "", "", "", f"[red]invalid[/red]: {exc}", "")
            continue
        workers = loaded.profile.workers
        gpu = (
            f"{workers.gpu_type or 'gpu'} x{workers.num_workers}"
            if workers.gpus_per_worker
            else "cpu"
        )
        table.add_row(
            path.stem,
            f"{workers.num_workers} on {workers.nodes} node(s)",
            gpu,
            loaded.profile.ray.address,
            "[green]ok[/green]",
            loaded.profile.description,
        )
    Console().print(table)


@cluster.command()
@click.argument("name")
@click.pass_context
def show(ctx: click.Context, name: str) -> None:
    """Print profile NAME with its `extends:` chain merged and every default filled in."""
    loaded = profiles.load_profile(profiles.find_profile(name, _directory(ctx)))
    check(loaded)
    data = loaded.profile.model_dump(mode="json", exclude={"extends"})
    # Each stage as a launch resolves it: the stage's own defaults (SFT: extension_prob
    # 0.5), then what the profile sets - not the bare recipe model's defaults.
    data["stages"] = {
        stage: loaded.profile.recipe(stage).model_dump(mode="json") for stage in STAGES
    }
    click.echo(f"# {loaded.path}\n" + yaml.safe_dump(data, sort_keys=False), nl=False)


@cluster.command()
@click.argument("paths", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def validate(ctx: click.Context, paths: tuple[Path, ...]) -> None:
    """Validate profile files (default: every profile in the clusters folder)."""
    targets = list(paths) or profiles.profile_paths(_directory(ctx))
    problems = []
    for path in targets:
        try:
            check(profiles.load_profile(path))
            click.echo(f"ok  {path}")
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        for problem in problems[:-1]:
            click.echo(f"Error: {problem}", err=True)
        raise ConfigError(problems[-1])


@cluster.command()
@click.option("--write", is_flag=True, help="Write clusters/schema.json instead of printing.")
@click.pass_context
def schema(ctx: click.Context, write: bool) -> None:
    """Print (or write) the JSON schema editors use to complete profile YAML."""
    text = profile_schema()
    if not write:
        click.echo(text, nl=False)
        return
    target = _directory(ctx) / profiles.SCHEMA_FILE
    target.write_text(text)
    click.echo(f"wrote {target}")
