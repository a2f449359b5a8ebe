"""Where a run's workers go, and whether a Ray cluster can hold them, before submitting.

Ray Train places one bundle per worker (``workers.cpus_per_worker`` CPUs, one GPU, the
``accelerator_type:GPU_TYPE`` label resource) with the profile's ``workers.placement``
strategy. A request the cluster can never meet does not fail in Ray: the job waits for
resources forever. ``check_cluster`` says what is missing instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from infra.config import RunConfig, WorkersConfig
from infra.errors import ConfigError, first_line
from orchestrator.ray_jobs import client_auth


def worker_resources(workers: WorkersConfig) -> dict[str, float]:
    """The Ray resources of one worker, as the training job asks for them."""
    resources = dict(workers.resources_per_worker)
    if workers.gpu_type:
        # Ray Train asks a sliver of the label resource per worker (any amount > 0).
        resources[f"accelerator_type:{workers.gpu_type}"] = 0.001
    return resources


def placement_lines(run: RunConfig) -> list[str]:
    """The placement `m2d launch --dry-run` shows."""
    w = run.workers
    need = ", ".join(f"{k} {v:g}" for k, v in worker_resources(w).items())
    return [
        f"workers: {w.num_workers} on {w.nodes} node(s), {w.workers_per_node} per node, "
        f"Ray placement {w.placement}",
        f"per worker: {need}",
        f"per node: {w.workers_per_node * w.cpus_per_worker} CPU"
        + (f", {w.workers_per_node * w.gpus_per_worker} GPU" if w.gpus_per_worker else "")
        + (f" ({w.gpu_type})" if w.gpu_type else ""),
    ]


@dataclass(frozen=True)
class Node:
    """What one alive Ray node has in all."""

    ip: str
    resources: dict[str, float]

    def holds(self, need: dict[str, float]) -> int:
        """How many workers needing ``need`` fit on this node when it is empty."""
        counts = []
        for key, amount in need.items():
            have = self.resources.get(key, 0.0)
            if key.startswith("accelerator_type:"):  # a label: present or not
                counts.append(10**6 if have > 0 else 0)
            else:
                counts.append(int(have // amount))
        return min(counts)

    def describe(self) -> str:
        shown = [
            f"{key.removeprefix('accelerator_type:')}={value:g}"
            for key, value in sorted(self.resources.items())
            if key in ("CPU", "GPU") or key.startswith("accelerator_type:")
        ]
        return f"{self.ip} {','.join(shown)}"


def cluster_nodes(address: str) -> list[Node]:
    """The alive nodes of the cluster behind ``address`` (its Ray dashboard)."""
    client_auth()
    from ray.util.state import list_nodes

    from infra.timeouts import network_timeout_s

    found = list_nodes(
        address=address,
        detail=True,
        raise_on_missing_output=False,
        timeout=max(1, round(network_timeout_s())),
    )
    return [Node(n.node_ip, dict(n.resources_total or {})) for n in found if n.state == "ALIVE"]


def check_cluster(run: RunConfig, nodes: list[Node] | None = None) -> None:
    """Refuse (one line) a run whose workers the cluster's alive nodes cannot hold."""
    w = run.workers
    if nodes is None:
        try:
            nodes = cluster_nodes(run.ray.address)
        except Exception as exc:  # the state API may be off: say so, refuse nothing
            import click

            click.echo(f"placement check skipped: {first_line(exc)}", err=True)
            return
    need = worker_resources(w)
    per_node = 1 if w.placement == "STRICT_SPREAD" else w.workers_per_node
    able = [node for node in nodes if node.holds(need) >= per_node]
    if len(able) >= w.nodes:
        return
    wanted = [f"{per_node * w.cpus_per_worker:g} CPU"]
    if w.gpus_per_worker:
        wanted.append(f"{per_node * w.gpus_per_worker:g} GPU")
    if w.gpu_type:
        wanted.append(f"label {w.gpu_type}")
    have = "; ".join(node.describe() for node in nodes) or "no alive node"
    raise ConfigError(
        f"ray.address {run.ray.address}: the run needs {w.nodes} node(s) with "
        f"{', '.join(wanted)} each ({per_node} worker(s) a node), the cluster has "
        f"{len(able)} ({have}); add nodes or change workers.*, or pass --force if the "
        "cluster autoscales"
    )
