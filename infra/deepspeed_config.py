"""The DeepSpeed JSON of a run, derived from its typed config in this one place.

Precision, batch sizes, clipping and the optimizer all come from :class:`RunConfig`, so
the launcher's ``--dry-run`` prints exactly what the workers hand to
``deepspeed.initialize``.
"""

from __future__ import annotations

from typing import Any

from infra.config import RunConfig

# Large enough that DeepSpeed's own step printing never interleaves with our progress.
_QUIET_STEPS = 10**9


def deepspeed_config(run: RunConfig) -> dict[str, Any]:
    """The ``config`` dict for ``deepspeed.initialize`` of this run."""
    ds, recipe = run.deepspeed, run.recipe
    config: dict[str, Any] = {
        "train_batch_size": recipe.global_batch,
        "train_micro_batch_size_per_gpu": ds.micro_batch_per_gpu,
        "gradient_accumulation_steps": ds.gradient_accumulation,
        "gradient_clipping": recipe.gradient_clipping,
        "zero_optimization": _zero(run),
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "optimizer": {"type": "AdamW", "params": _adamw(run)},
        "scheduler": _schedule(run),
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }
    return config


def _adamw(run: RunConfig) -> dict[str, Any]:
    recipe = run.recipe
    params: dict[str, Any] = {
        "lr": recipe.learning_rate,
        "betas": list(recipe.betas),
        "eps": recipe.eps,
        "weight_decay": recipe.weight_decay,
    }
    if run.workers.gpus_per_worker == 0:
        # DeepSpeed's compiled CPU Adam recomputes beta^t after load_checkpoint and drifts in
        # the last bits, so a resumed CPU run would not equal an uninterrupted one.
        params["torch_adam"] = True
    return params


def _schedule(run: RunConfig) -> dict[str, Any]:
    """Constant after a linear warm-up: the recipe's schedule (no warm-up: constant)."""
    recipe = run.recipe
    return {
        "type": "WarmupLR",
        "params": {
            # DeepSpeed needs >= 1 warm-up step; starting at the peak makes it constant.
            "warmup_min_lr": 0.0 if recipe.warmup_steps else recipe.learning_rate,
            "warmup_max_lr": recipe.learning_rate,
            "warmup_num_steps": max(recipe.warmup_steps, 1),
            "warmup_type": "linear",
        },
    }


def _zero(run: RunConfig) -> dict[str, Any]:
    ds = run.deepspeed
    on_gpu = run.workers.gpus_per_worker > 0
    # Overlapping and the contiguous gradient buffer pay off against GPU streams and
    # allocator fragmentation; on CPU workers they only add a copy and Python per
    # parameter (a quarter of a tiny model's step).
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": on_gpu,
        "contiguous_gradients": on_gpu,
    }
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": True}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param, "pin_memory": True}
    if ds.zero_stage == 3:
        # Export writes one consolidated diffusers folder; gather the shards on save.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return zero
