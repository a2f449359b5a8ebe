"""``m2d data``: synthesize a small dataset and inspect manifests.

The work runs in ``trainer.data`` job modules started as subprocesses with this Python:
the orchestrator never imports the trainer (or torch), so the CLI stays instant.
"""

from __future__ import annotations

import click

from infra.job_specs import InspectSpec, SynthSpec, default_of
from orchestrator.commands.data_filter import filter_
from orchestrator.commands.data_precompute import precompute
from orchestrator.jobs import make_spec, parse_size, run_job


@click.group()
def data() -> None:
    """Synthesize and inspect training data."""


@data.command()
@click.option("--out", required=True, help="New (or empty) folder or s3:// URI.")
@click.option(
    "--stories",
    default=default_of(SynthSpec, "stories"),
    show_default=True,
    help="Stories (shot groups).",
)
@click.option(
    "--scenes",
    default=default_of(SynthSpec, "scenes"),
    show_default=True,
    help="Scenes per training story.",
)
@click.option("--shots", type=int, default=None, help="Shots per story [default: scenes + 1].")
@click.option(
    "--frames", default=default_of(SynthSpec, "frames"), show_default=True, help="Frames per shot."
)
@click.option("--size", default="32x32", show_default=True, help="HEIGHTxWIDTH of the videos.")
@click.option(
    "--fps", default=default_of(SynthSpec, "fps"), show_default=True, help="Frames per second."
)
@click.option(
    "--seed",
    default=default_of(SynthSpec, "seed"),
    show_default=True,
    help="Same seed, same dataset.",
)
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// output.")
def synth(size: str, **options) -> None:
    """Write mp4 stories with recurring characters plus pretrain.jsonl and sft.jsonl."""
    height, width = parse_size(size)
    sizes = {"height": "--size", "width": "--size"}
    run_job(
        "trainer.data.synth", make_spec(SynthSpec, sizes, height=height, width=width, **options)
    )


@data.command()
@click.argument("manifest")
@click.option("--scenes", type=int, default=None, help="Read as SFT shot groups of N scenes.")
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// paths.")
def inspect(**options) -> None:
    """Count the usable rows (or SFT groups) of MANIFEST and the skipped ones by reason."""
    run_job("trainer.data.manifest", make_spec(InspectSpec, **options))


data.add_command(filter_)
data.add_command(precompute)
