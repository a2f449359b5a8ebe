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
    """The plan as a few aligned lines, in units that fit its size (MiB and GFLOP for a
    toy run, GiB and PFLOP for CogVideoX)."""
    run, seq, memory = plan.run, plan.sequence, plan.memory
    where = f"{plan.gpus} x {plan.accelerator.name}" if plan.accelerator else "CPU workers"
    counts = plan.parameters
    lines = [
        f"plan: {run.stage} on {run.cluster} ({where}, ZeRO-{run.deepspeed.zero_stage}, "
        f"{run.deepspeed.precision}, activation checkpointing "
        f"{'on' if run.deepspeed.activation_checkpointing else 'off'})",
        f"model: {count(counts['transformer'])} trained, T5 {count(counts['text_encoder'])}, "
        f"VAE {count(counts['vae'])} parameters; {seq.tokens:,} tokens per sample "
        f"({seq.num_scenes} scenes x ({seq.text_per_scene} text + {seq.video_per_scene:,} "
        "video))",
        "",
        "memory per GPU" if run.workers.gpus_per_worker else "memory per worker",
    ]
    unit, size = _memory_unit(memory.peak)
    on, off = (plan.activations_by_checkpointing[c] / size for c in (True, False))
    for kind in MEMORY_KINDS:
        lines.append(f"  {_LABELS[kind]:<44} {getattr(memory, kind) / size:9.2f} {unit}")
        if kind == "activations":
            lines.append(f"    (transformer: {on:.2f} {unit} checkpointed, {off:.2f} {unit} not)")
    limit = plan.memory_gib
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    against = f" of {limit:.1f} GiB: {verdict}" if limit else ""
    lines.append(f"  {'peak':<44} {memory.peak / size:9.2f} {unit}{against}")
    if memory.cpu:
        lines.append(f"  {'offloaded to host memory':<44} {memory.cpu / size:9.2f} {unit}")
    lines += ["", f"compute: {flops(plan.step_flops)} per step (model FLOPs)"]
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
    elif plan.stage_gpu_hours is not None:
        lines.append("  cost: set plan.usd_per_gpu_hour in the profile (or --set) to see it")
    if not plan.fits:
        lines.append("")
        if plan.suggestion:
            sets = " ".join(f"--set {a}" for a in plan.suggestion)
            lines.append(f"cheapest change that fits: {sets}")
        else:
            lines.append("no single change of ZeRO, offload, checkpointing or nodes fits")
    return "\n".join(lines) + "\n"


def _memory_unit(peak_bytes: float) -> tuple[str, float]:
    """GiB, or MiB below 1 GiB, and its size in bytes."""
    return ("GiB", GIB) if peak_bytes >= GIB else ("MiB", 2**20)


def count(value: float) -> str:
    """A parameter count to 3 significant digits: 5.57B, 42.2K, 812."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def flops(value: float) -> str:
    """A FLOP count in the largest unit that keeps it at 1 or more: 2.3 PFLOP, 14.1 GFLOP."""
    for size, unit in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if value >= size:
            return f"{value / size:,.1f} {unit}"
    return f"{value:,.0f} FLOP"


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
