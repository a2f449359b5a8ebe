"""The first thing to run when a GPU is at hand: one command, under 8 minutes on one
H100/H200, one JSON report (issue 16, point 6).

    .venv/bin/python benchmarks/gpu_check.py [--out REPORT.json]
    .venv/bin/python benchmarks/gpu_check.py --dry-run     # CPU, small shapes (CI runs it)

Sections, each recorded even when another fails (a section's error is its entry):

1. ``gpu_tests``: the ``gpu``-marked tests (CUDA attention against the float64 reference).
2. ``attention``: masked attention (v2) at L = 53,328 tokens (3 x 49 x 480x720), 48 heads
   of 64, bf16 - forward + backward time and peak memory against unmasked flash SDPA,
   and the ``full`` policy's output against SDPA's (the same attention, so a difference
   is an error).
3. ``training``: 5 steps of m2d's engine (DeepSpeed ZeRO-2, bf16, activation
   checkpointing) over CogVideoX-2B's config with random weights at 1 x 49 x 480x720,
   precomputed-latent inputs: seconds per step, MFU, peak memory next to the planner's.
4. ``sample``: one two-scene story through ``MultiScenePipeline`` (tiny weights) on the
   device: the sampling code path end to end.

``--dry-run`` runs every section on the CPU at small shapes, so the script is known to
work before a GPU is ever lent. Results go to docs/benchmarks.md with the date.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MODELS = ROOT / "orchestrator" / "plan" / "model_configs"
GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, small shapes")
    parser.add_argument("--out", default=None, help="report path (default $OUT or cwd)")
    args = parser.parse_args()
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run with --dry-run on a CPU machine")
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "dry_run": args.dry_run}
    report["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    report["torch"] = torch.__version__
    sections = (
        ("gpu_tests", gpu_tests),
        ("attention", attention),
        ("training", training),
        ("sample", sample),
    )
    for name, section in sections:
        started = time.perf_counter()
        try:
            report[name] = section(device, args.dry_run)
        except Exception as exc:  # a failed section is a result too
            report[name] = {
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc(),
            }
        report[name]["seconds"] = round(time.perf_counter() - started, 1)
        out.write_text(json.dumps(report, indent=1) + "\n")  # partial reports survive a timeout
        print(f"{name}: {json.dumps({k: v for k, v in report[name].items() if k != 'trace'})}")
    print(f"report: {out}")


def gpu_tests(device: torch.device, dry_run: bool) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/unit", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    tail = done.stdout.strip().splitlines()[-1:] or [""]
    return {"exit_code": done.returncode, "summary": tail[0]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / GIB, 3) if device.type == "cuda" else None


def _timed(device: torch.device, fn, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - started) / repeats


def attention(device: torch.device, dry_run: bool) -> dict[str, Any]:
    import torch.nn.functional as F

    from mask2dit.attention import SceneLayout, masked_attention

    text, frames, tokens_per_frame = (8, 2, 16) if dry_run else (226, 13, 30 * 45)
    heads, head_dim = (4, 16) if dry_run else (48, 64)
    layout = SceneLayout.from_frames([text] * 3, [frames] * 3, tokens_per_frame)
    shape = (1, heads, layout.seq_len, head_dim)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
        for _ in range(3)
    )
    grad = torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16)
    result: dict[str, Any] = {"seq_len": layout.seq_len, "heads": heads, "head_dim": head_dim}

    def run(attend):
        def step():
            out = attend()
            torch.autograd.grad(out, (q, k, v), grad)

        _peak_reset(device)
        seconds = _timed(device, step, repeats=3)
        return round(seconds * 1000, 2), _peak_gib(device)

    sdpa = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    result["sdpa_ms"], result["sdpa_peak_gib"] = run(sdpa)
    result["v2_ms"], result["v2_peak_gib"] = run(lambda: masked_attention(q, k, v, layout, "v2"))
    result["v2_over_sdpa"] = round(result["v2_ms"] / result["sdpa_ms"], 3)
    with torch.no_grad():
        full = masked_attention(q, k, v, layout, "full").float()
        reference = sdpa().float()
    result["full_vs_sdpa_max_abs"] = float((full - reference).abs().max())
    result["ok"] = result["full_vs_sdpa_max_abs"] < 2e-2  # bf16 rounding of two kernels
    return result


def _training_run(device: torch.device, dry_run: bool):
    """The run the training section trains, as m2d would resolve it, and its model config."""
    import yaml

    from infra.config import ClusterProfile, resolve_run
    from mask2dit.tiny import tiny_configs

    gpu = device.type == "cuda"
    name = "a100x8" if gpu else "local"
    data = yaml.safe_load((ROOT / "clusters" / f"{name}.yaml").read_text())
    if gpu:
        config = json.loads((MODELS / "CogVideoX-2b" / "transformer" / "config.json").read_text())
        data["model"]["source"] = str(MODELS / "CogVideoX-2b")
        data["workers"]["gpu_type"] = _ray_gpu_label()
        frames, height, width = 49, 480, 720
    else:
        config = tiny_configs("tiny_sincos")["transformer"]
        frames, height, width = 9, 64, 64
    data["data"] = {"sft_latents": "/precomputed"}  # latents and T5 text come in ready
    data["workers"].update(num_workers=1, nodes=1)
    overrides = {
        "deepspeed": {"precision": "bf16", "activation_checkpointing": True, "zero_stage": 2},
        "recipe": {
            "global_batch": 1,
            "num_scenes": 1,
            "extension_prob": 0.0,
            "frames": frames,
            "height": height,
            "width": width,
            "warmup_steps": 0,
        },
    }
    return resolve_run(ClusterProfile.model_validate(data), name, "sft", overrides), config


def _ray_gpu_label() -> str:
    name = torch.cuda.get_device_name()
    for label in ("H200", "H100", "A100", "L40S", "A10G"):
        if label in name:
            return label
    return "H100"


def training(device: torch.device, dry_run: bool) -> dict[str, Any]:
    import torch.distributed as dist
    from diffusers import CogVideoXTransformer3DModel

    from infra.processes import free_port
    from mask2dit.model import Mask2DiT
    from mask2dit.tiny import tiny_configs
    from orchestrator.plan.estimate import GIB as PLAN_GIB
    from orchestrator.plan.estimate import ModelConfigs, plan_run
    from trainer.engine import build_engine

    run, config = _training_run(device, dry_run)
    plan = plan_run(run, ModelConfigs(**{**tiny_configs(), "transformer": config}))
    os.environ.setdefault("LOCAL_RANK", "0")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = Mask2DiT(CogVideoXTransformer3DModel(**config))
        engine = build_engine(run, model)
        seq = plan.sequence
        latents = torch.randn(
            1, seq.latent_frames, config["in_channels"],
            seq.latent_height * config["patch_size"], seq.latent_width * config["patch_size"],
            device=device, dtype=torch.bfloat16,
        )  # fmt: skip
        text = torch.randn(1, seq.text_tokens, config["text_embed_dim"], device=device,
                           dtype=torch.bfloat16)  # fmt: skip
        target = torch.randn_like(latents, dtype=torch.float32)
        timesteps = torch.tensor([500], device=device)
        losses, seconds = [], []
        _peak_reset(device)
        for _ in range(5):
            _sync(device)
            started = time.perf_counter()
            pred = engine(latents, text, timesteps, [seq.latent_frames])
            loss = (pred.float() - target).square().mean()
            engine.backward(loss)
            engine.step()
            _sync(device)
            seconds.append(time.perf_counter() - started)
            losses.append(round(loss.item(), 5))
    finally:
        dist.destroy_process_group()
    step = sorted(seconds[1:])[len(seconds[1:]) // 2]  # median after the first
    peak_tflops = plan.accelerator.peak_tflops if plan.accelerator else None
    return {
        "tokens": seq.tokens,
        "losses": losses,
        "step_seconds": round(step, 3),
        "mfu": round(plan.step_flops / step / (peak_tflops * 1e12), 3) if peak_tflops else None,
        "peak_allocated_gib": _peak_gib(device),
        # The allocator's peak holds neither the CUDA context nor fragmentation.
        "planned_allocated_gib": round((plan.memory.peak - plan.memory.overhead) / PLAN_GIB, 3),
        "planned_peak_gib": round(plan.memory.peak / PLAN_GIB, 3),
        "planned_breakdown_gib": plan.memory.gib(),
        "ok": all(map(lambda x: x == x and abs(x) < 1e4, losses)),
    }


def sample(device: torch.device, dry_run: bool) -> dict[str, Any]:
    from mask2dit.components import tiny_parts
    from mask2dit.sampling.params import SamplingParams
    from mask2dit.sampling.pipeline import MultiScenePipeline

    pipeline = MultiScenePipeline.from_parts(tiny_parts(seed=0)).to(device)
    if device.type == "cuda":
        pipeline.transformer.to(dtype=torch.bfloat16)
    params = SamplingParams(num_inference_steps=4, text_tokens=8, num_frames=9, height=32, width=32)
    g = torch.Generator(device=device).manual_seed(0)
    story = pipeline.generate(["a red kite rises", "the kite lands"], params, generator=g)
    shapes = [list(scene.shape) for scene in story.frames]
    finite = bool(torch.isfinite(story.latents.float()).all())
    return {"scenes": len(shapes), "frame_shapes": shapes, "ok": finite and len(shapes) == 2}


if __name__ == "__main__":
    main()
