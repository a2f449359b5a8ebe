"""``m2d data filter``: keep SFT windows whose adjacent scenes look alike (a Ray Data job).

The job is ``datajobs.filter``, run as a subprocess: this module imports nothing
heavy, so ``m2d --help`` stays instant.
"""

from __future__ import annotations

import click

from infra.job_specs import FilterSpec
from orchestrator.jobs import make_spec, run_here, spec_options


@click.command("filter")
@spec_options(FilterSpec, *FilterSpec.model_fields)
def filter_(**options) -> None:
    """Embed every shot of an SFT manifest and keep the windows of similar scenes."""
    run_here("datajobs.filter", make_spec(FilterSpec, **options))
