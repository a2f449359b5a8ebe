"""Joining Ray from a job's driver: the cluster that submitted it, or a fresh local one."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from infra.processes import free_port

__all__ = ["LOOPBACK_IFNAME", "init_ray", "ray_session"]

# The interface Gloo and NCCL open their listeners on in a local Ray (Linux names it lo).
LOOPBACK_IFNAME = "lo0" if sys.platform == "darwin" else "lo"

# A local Ray runs this machine's job and nothing else, so its workers are the work. Ray
# nices workers to 15 so that on a shared cluster they yield to its daemons (ray-project/
# ray#24928); here that gives every wake-up of the GCS, the raylet, the dashboard and the
# driver a training worker's core, and the other rank's all-reduce waits it out. Nothing
# scrapes a local Ray's Prometheus metrics (MLflow is the dashboard) and nobody drains
# its node, so the agents' metric exports and Ray Train's preemption watcher (a poll
# every 5 s) would only take CPU from the workers. Measured: docs/benchmarks.md, issue 16.
# Ray Train's controller learns of every worker event (group started, a report, the end)
# at its next poll of the workers, every 2 s by default: a local job waits out several of
# them at each start and end for nothing. Two workers on this host answer a poll every
# 0.5 s in microseconds (docs/benchmarks.md, "Launch overhead"). A user's own values win.
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0, "enable_metrics_collection": False}
LOCAL_WORKER_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
# Every 5 s the dashboard agent composes the node view of Ray's dashboard (psutil over
# every Ray process): a burst that takes a training worker's core and holds up the other
# rank's all-reduce. Nobody opens a local Ray's dashboard; once a minute is plenty. Read by
# the agent at its start, so set in the environment the daemons inherit; a user's wins.
LOCAL_DAEMON_ENV = {"REPORTER_UPDATE_INTERVAL_MS": "60000"}


def init_ray(num_cpus: int | None = None, *, log_to_driver: bool = True) -> bool:
    """Join the cluster of ``RAY_ADDRESS`` (Ray Jobs sets it), else start Ray on 127.0.0.1.

    ``num_cpus`` sizes a local Ray only (a joined cluster has its own resources). Returns
    False when Ray was already initialised here, True when this call connected - so the
    caller knows whether the shutdown is its to do.
    """
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=log_to_driver)
        return True
    # "local" starts a fresh Ray even where another left /tmp/ray/ray_current_cluster;
    # loopback because the detected node address may not be routable (containers).
    # Ray Train's placement-group cleaner polls the State API, which finds its cluster
    # through that same file: name the dashboard of this cluster to every worker instead,
    # or the cleaner waits on a stale address and holds up every shutdown by 12 s.
    port = free_port()
    # Nothing of a local Ray may listen beyond this host. Its processes bind the node
    # address, and ray.init replaces a loopback one with the machine's outward address
    # unless "clusters" are off (services.resolve_ip_for_localhost): a constant Ray reads
    # from the environment on import - already done here, and to come in every Ray
    # process started below, which inherit the variable.
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    for name, value in LOCAL_DAEMON_ENV.items():
        os.environ.setdefault(name, value)
    # The training workers' process group (Gloo on CPUs, NCCL on GPUs) listens on the
    # interface these name, else on the hostname's address; one a user set still wins.
    ifnames = {
        name: os.environ.get(name, LOOPBACK_IFNAME)
        for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
    }
    ray.init(
        address="local",
        num_cpus=num_cpus,
        _node_ip_address="127.0.0.1",
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env={
            "env_vars": {
                "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
                **ifnames,
                **{name: os.environ.get(name, value) for name, value in LOCAL_WORKER_ENV.items()},
            }
        },
        _system_config=LOCAL_SYSTEM_CONFIG,
        log_to_driver=log_to_driver,
    )
    return True


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None, *, log_to_driver: bool = True) -> Iterator[None]:
    """Ray joined or started for a block, and shut down after it where this block began it
    (a caller that already had Ray keeps it): a job leaves its process as it found it."""
    import ray

    started = init_ray(num_cpus, log_to_driver=log_to_driver)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
