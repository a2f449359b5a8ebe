"""The planner: what a training run needs per GPU and what it costs, from configs alone."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infra.config import RunConfig
    from orchestrator.plan.estimate import Plan


def plan_for(run: RunConfig) -> Plan:
    """The plan of ``run`` (its model's configs read from ``model.source``), with the
    cheapest change that fits when it does not."""
    from orchestrator.plan.estimate import plan_with_suggestion
    from orchestrator.plan.sources import read_model_configs

    return plan_with_suggestion(run, read_model_configs(run.model, run.storage))
