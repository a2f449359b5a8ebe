"""Joining Ray from a job's driver: the cluster that submitted it, or a fresh local one."""

from __future__ import annotations

import os

__all__ = ["init_ray"]


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster of ``RAY_ADDRESS`` (Ray Jobs sets it), else start Ray on 127.0.0.1.

    ``num_cpus`` sizes a local Ray only (a joined cluster has its own resources).
    """
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(ignore_reinit_error=True)
        return
    # "local" starts a fresh Ray even where another left /tmp/ray/ray_current_cluster;
    # loopback because the detected node address may not be routable (containers).
    ray.init(
        address="local",
        num_cpus=num_cpus,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        ignore_reinit_error=True,
    )
