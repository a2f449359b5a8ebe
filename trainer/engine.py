"""The DeepSpeed engine of a run, over the Mask²DiT transformer.

The DeepSpeed JSON comes from :func:`infra.deepspeed_config.deepspeed_config` only. On GPU
workers DeepSpeed builds its ``AdamW`` optimizer and ``WarmupLR`` scheduler from it.

On CPU workers the config's ``AdamW`` does work - it resolves to DeepSpeed's CPU
``FusedAdam`` op, a C++ extension compiled on first use - but that op keeps beta1^t and
beta2^t as running products and recomputes them with ``pow`` when the step jumps, as it
does after ``load_checkpoint``. A resumed run then differs from an uninterrupted one in
the last bits after its first step, which breaks exact resume. CPU workers therefore get
a ``torch.optim.AdamW`` built from the *same* config entry's params (bias correction from
the step count every step), and the scheduler stays DeepSpeed's, from the config.

DeepSpeed's CPU communication backend also compiles a shared-memory all-reduce op on its
first start (about a minute, on every fresh machine or image) that only its inference
path calls (``inference_all_reduce``); training collectives go through the process group
(gloo). CPU workers mark that op unavailable, so a CPU worker compiles nothing.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from infra.config import RunConfig
from infra.deepspeed_config import deepspeed_config
from infra.errors import ConfigError
from infra.logging import get_logger

__all__ = ["build_engine", "device_and_dtype"]

log = get_logger("trainer.engine")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def device_and_dtype(run: RunConfig) -> tuple[torch.device, torch.dtype]:
    """This worker's device and the transformer's dtype: the profile's, never a fallback.

    A GPU profile whose worker sees no CUDA device fails here, naming the node, rather
    than training on its CPU in another precision.
    """
    dtype = _DTYPES[run.deepspeed.precision]
    if run.workers.gpus_per_worker == 0:
        return torch.device("cpu"), dtype
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise ConfigError(
            f"node {platform.node()}: the profile gives each worker a GPU "
            f"(workers.gpus_per_worker: 1) but this worker sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={visible}); check the node's driver and the GPUs Ray "
            "reports (`ray status`), or use a CPU profile"
        )
    import ray.train.torch

    return ray.train.torch.get_device(), dtype


def build_engine(run: RunConfig, transformer: torch.nn.Module) -> Any:
    """``deepspeed.initialize`` over ``transformer`` with the run's DeepSpeed config.

    Needs an initialised ``torch.distributed`` process group (Ray Train's, or gloo in a
    single-process test). Turns on per-block activation checkpointing when configured.
    """
    import deepspeed

    if device_and_dtype(run)[0].type == "cpu":
        _skip_shared_memory_allreduce()
    if run.deepspeed.activation_checkpointing:
        transformer.transformer.enable_gradient_checkpointing()
    parameters = [p for p in transformer.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=transformer,
        model_parameters=parameters,
        config=deepspeed_config(run),
        dist_init_required=False,
    )
    log.info(
        "DeepSpeed ZeRO-%d engine: %s optimizer, %d trainable parameters",
        run.deepspeed.zero_stage,
        type(engine.optimizer).__name__,
        sum(p.numel() for p in parameters),
    )
    return engine


def _skip_shared_memory_allreduce() -> None:
    """Tell DeepSpeed's CPU backend its shared-memory all-reduce op is unavailable: it
    then uses the process group for everything instead of compiling the op."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        # The table is probed once per process and kept: DeepSpeed reads this entry
        # before it builds the op (deepspeed.comm.torch.build_shm_op).
        deepspeed.ops.__compatible_ops__[builder.NAME] = False
