"""The planner: what a training run needs per GPU and what it costs, from configs alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infra.config import RunConfig
    from orchestrator.plan.estimate import Plan


def plan_for(run: RunConfig, warn: Callable[[str], None] | None = None) -> Plan:
    """The plan of ``run`` (its model's configs read from ``model.source``, else m2d's
    copy of a model of that name, said to ``warn``), with the cheapest change that fits
    when it does not."""
    from orchestrator.plan.estimate import plan_with_suggestion
    from orchestrator.plan.sources import read_model_configs

    return plan_with_suggestion(run, read_model_configs(run.model, run.storage, warn))
