"""The workers' torch process group, with its rendezvous store on 127.0.0.1 in a local Ray.

Ray Train's ``TorchConfig`` has rank 0 host torch's rendezvous store (a ``TCPStore``),
which listens on every interface whatever host it is given: its only way to choose is a
listening socket handed over as ``master_listen_fd``, which Ray Train never passes. For
a run on the embedded local Ray, where nothing may listen beyond this host, rank 0 hosts
the store on a socket bound to 127.0.0.1 and every rank joins it; the process group is
otherwise Ray Train's (backend, timeout, LOCAL_RANK and the other torch variables,
shutdown). Runs on a Ray cluster keep Ray Train's own setup, which multi-node needs.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

from infra.config import RunConfig

__all__ = ["LoopbackTorchConfig", "torch_config"]

_LOOPBACK = "127.0.0.1"
_store: dist.TCPStore | None = None  # the store rank 0's worker hosts, kept alive here


def torch_config(run: RunConfig) -> TorchConfig:
    """The process-group setup of ``run``'s workers: loopback-only on the local Ray."""
    return LoopbackTorchConfig() if run.ray.address == "local" else TorchConfig()


class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose rendezvous store listens on 127.0.0.1 only (one node)."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        backend = backend_config.backend
        if backend is None:
            gpus = worker_group.get_resources_per_worker().get("GPU", 0)
            backend = "nccl" if gpus else "gloo"
        port = worker_group.execute_single(0, _host_store, timeout_s=backend_config.timeout_s)
        worker_group.execute(_set_torch_distributed_env_vars)
        joined = [
            worker_group.execute_single_async(
                rank,
                _join,
                backend=backend,
                world_rank=rank,
                world_size=len(worker_group),
                port=port,
                timeout_s=backend_config.timeout_s,
            )
            for rank in range(len(worker_group))
        ]
        ray.get(joined)


def _host_store(timeout_s: int) -> int:
    """Start the store on a socket bound to 127.0.0.1 (in rank 0's worker); its port."""
    global _store
    listener = socket.socket()
    listener.bind((_LOOPBACK, 0))
    listener.listen()
    port = listener.getsockname()[1]
    _store = dist.TCPStore(
        _LOOPBACK,
        port,
        is_master=True,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
        master_listen_fd=listener.detach(),  # the store owns the socket from here
        use_libuv=True,  # the backend that takes a listening socket
    )
    return port


def _join(backend: str, world_rank: int, world_size: int, port: int, timeout_s: int) -> None:
    """Join the process group through the loopback store (in every worker)."""
    os.environ.update(MASTER_ADDR=_LOOPBACK, MASTER_PORT=str(port))
    if backend == "nccl":  # as Ray Train sets it: fail, not hang, on a stuck collective
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = timedelta(seconds=timeout_s)
    store = _store if world_rank == 0 else dist.TCPStore(_LOOPBACK, port, timeout=timeout)
    dist.init_process_group(
        backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout
    )
