"""``m2d data filter``: keep SFT windows whose adjacent scenes look alike (a Ray Data job).

The job is ``datajobs.filter``, run as a subprocess: this module imports nothing
heavy, so ``m2d --help`` stays instant.
"""

from __future__ import annotations

import click

from infra.config import StorageConfig
from infra.job_specs import FilterSpec
from orchestrator.jobs import make_spec, object_store, run_here, spec_options


@click.command("filter")
@spec_options(FilterSpec, *(field for field in FilterSpec.model_fields if field != "storage"))
@spec_options(StorageConfig, "endpoint_url")
def filter_(endpoint_url: str | None, **options) -> None:
    """Embed every shot of an SFT manifest and keep the windows of similar scenes."""
    storage = object_store(options["manifest"], endpoint_url)
    run_here("datajobs.filter", make_spec(FilterSpec, storage=storage, **options))
