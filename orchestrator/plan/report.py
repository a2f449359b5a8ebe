"""A plan as `m2d plan` prints it: a table for people, one JSON object for scripts."""

from __future__ import annotations

from typing import Any

from orchestrator.plan.estimate import GIB, MEMORY_KINDS, Plan

_LABELS = {
    "params": "parameters (trained, in the training dtype)",
    "grads": "gradients (this rank's partition)",
    "optimizer": "optimizer (fp32 master + AdamW moments)",
    "activations": "activations (one micro-batch)",
    "frozen": "frozen T5 + VAE",
    "buffers": "DeepSpeed buffers",
    "overhead": "CUDA context + fragmentation",
}


def as_json(plan: Plan) -> dict[str, Any]:
    """The plan as one JSON-ready object (the keys docs/planner.md documents)."""
    run = plan.run
    return {
        "cluster": run.cluster,
        "stage": run.stage,
        "gpu": plan.accelerator.name if plan.accelerator else None,
        "gpus": plan.gpus,
        "gpu_memory_gib": plan.memory_gib,
        "per_gpu_peak_gib": round(plan.memory.peak / GIB, 3),
        "fits": plan.fits,
        "breakdown_gib": plan.memory.gib(),
        "cpu_offload_gib": round(plan.memory.cpu / GIB, 3),
        "activations_gib_by_checkpointing": {
            "on": round(plan.activations_by_checkpointing[True] / GIB, 3),
            "off": round(plan.activations_by_checkpointing[False] / GIB, 3),
        },
        "tokens_per_sample": plan.sequence.tokens,
        "parameters": plan.parameters,
        "flops_per_step": plan.step_flops,
        "mfu": run.plan.mfu,
        "step_seconds": _round(plan.step_seconds, 3),
        "stage_hours": _round(plan.stage_hours, 3),
        "stage_gpu_hours": _round(plan.stage_gpu_hours, 2),
        "usd_per_gpu_hour": run.plan.usd_per_gpu_hour,
        "cost_usd": _round(plan.cost_usd, 2),
        "suggestion": plan.suggestion,
    }


def as_table(plan: Plan) -> str:
    """The plan as a few aligned lines."""
    run, seq, memory = plan.run, plan.sequence, plan.memory
    where = f"{plan.gpus} x {plan.accelerator.name}" if plan.accelerator else "CPU workers"
    lines = [
        f"plan: {run.stage} on {run.cluster} ({where}, ZeRO-{run.deepspeed.zero_stage}, "
        f"{run.deepspeed.precision}, activation checkpointing "
        f"{'on' if run.deepspeed.activation_checkpointing else 'off'})",
        f"model: {plan.parameters['transformer'] / 1e9:.3g}B trained, T5 "
        f"{plan.parameters['text_encoder'] / 1e9:.3g}B, VAE {plan.parameters['vae'] / 1e6:.3g}M "
        f"parameters; {seq.tokens:,} tokens per sample ({seq.num_scenes} scenes x "
        f"({seq.text_per_scene} text + {seq.video_per_scene:,} video))",
        "",
        "memory per GPU" if run.workers.gpus_per_worker else "memory per worker",
    ]
    on, off = (plan.activations_by_checkpointing[c] / GIB for c in (True, False))
    for kind in MEMORY_KINDS:
        lines.append(f"  {_LABELS[kind]:<44} {getattr(memory, kind) / GIB:9.2f} GiB")
        if kind == "activations":
            lines.append(f"    (transformer: {on:.2f} GiB checkpointed, {off:.2f} GiB not)")
    limit = plan.memory_gib
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    against = f" of {limit:.1f} GiB: {verdict}" if limit else ""
    lines.append(f"  {'peak':<44} {memory.peak / GIB:9.2f} GiB{against}")
    if memory.cpu:
        lines.append(f"  {'offloaded to host memory':<44} {memory.cpu / GIB:9.2f} GiB")
    lines += ["", f"compute: {plan.step_flops / 1e15:,.1f} PFLOP per step (model FLOPs)"]
    if plan.step_seconds is None:
        lines.append("  step time: unknown (set plan.peak_tflops for these workers)")
    else:
        lines.append(
            f"  at {run.plan.mfu:.0%} MFU: {plan.step_seconds:,.2f} s per step, "
            f"{plan.stage_hours:,.1f} h for {run.recipe.steps:,} steps, "
            f"{plan.stage_gpu_hours:,.0f} GPU-hours"
        )
    if plan.cost_usd is not None:
        lines.append(f"  cost at ${run.plan.usd_per_gpu_hour:g}/GPU-hour: ${plan.cost_usd:,.0f}")
    if not plan.fits:
        lines.append("")
        if plan.suggestion:
            sets = " ".join(f"--set {a}" for a in plan.suggestion)
            lines.append(f"cheapest change that fits: {sets}")
        else:
            lines.append("no single change of ZeRO, offload, checkpointing or nodes fits")
    return "\n".join(lines) + "\n"


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
