"""``m2d dashboard``: the MLflow UI of a cluster profile's tracking store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import click

from orchestrator import profiles


def ui_command(tracking_uri: str, port: int) -> list[str]:
    """`mlflow server` on 127.0.0.1 over a local tracking store (sqlite or a folder)."""
    mlflow = Path(sys.executable).with_name("mlflow")
    return [
        str(mlflow),
        "server",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


@click.command()
@click.option("--cluster", "cluster_name", required=True, help="Profile name in clusters/.")
@click.option("--port", default=5000, show_default=True, help="Local port of the UI.")
@click.pass_context
def dashboard(ctx: click.Context, cluster_name: str, port: int) -> None:
    """Open the MLflow UI of CLUSTER's tracking URI on 127.0.0.1 (Ctrl-C stops it)."""
    directory = profiles.clusters_dir(ctx.find_root().obj["clusters_dir"])
    tracking = profiles.load_profile(
        profiles.find_profile(cluster_name, directory)
    ).profile.tracking
    if tracking.uri.startswith(("http://", "https://")):
        # A tracking server already serves its UI; nothing to start.
        click.echo(f"MLflow UI: {tracking.uri} (experiment {tracking.experiment})")
        return
    process = subprocess.Popen(ui_command(tracking.uri, port), start_new_session=True)
    click.echo(f"MLflow UI: http://127.0.0.1:{port} (experiment {tracking.experiment})")
    try:
        code = process.wait()
    except KeyboardInterrupt:
        os.killpg(process.pid, signal.SIGTERM)
        code = process.wait()
    if code not in (0, -signal.SIGTERM):
        raise click.ClickException(f"the MLflow UI exited with status {code}")
