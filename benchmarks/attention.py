"""Time and peak memory of masked_attention against unmasked and dense-mask SDPA.

Methods: ``sdpa`` (F.scaled_dot_product_attention, no mask: the speed bar), ``masked``
(mask2dit.attention.masked_attention) and ``dense`` (SDPA with the bool mask from
build_attention_mask, built once outside the timed region).

Timing: all methods in one process, interleaved round-robin (sdpa, masked, dense, sdpa,
...), so that load from other processes on a shared machine hits them alike; median of
``--repeat`` rounds after ``--warmup`` rounds, ``torch.set_num_threads(--threads)``.
Peak memory: each (method, length, pass) in a fresh subprocess: one warm-up step (one-off
costs such as autograd's thread), then a peak window around one measured step. On CPU
(Linux) the window is peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS at its
start, with glibc's mmap threshold pinned so freed tensors leave RSS; on CUDA
``max_memory_allocated`` minus ``memory_allocated``. The dense method's mask is counted.

    python benchmarks/attention.py                       # CPU, L ~ 6k and ~12k
    python benchmarks/attention.py --device cuda --dtype bfloat16 --heads 48 \\
        --lengths 12000 53328 --methods sdpa masked      # production length on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mask2dit.attention import SceneLayout, build_attention_mask, masked_attention

METHODS = ("sdpa", "masked", "dense")
PASSES = ("fwd", "fwd+bwd")


def make_layout(target_len: int, num_scenes: int, text_len: int) -> SceneLayout:
    """n scenes of ``text_len`` text tokens and equal video blocks, total close to target."""
    video_per_scene = max(1, round((target_len - num_scenes * text_len) / num_scenes))
    return SceneLayout([text_len] * num_scenes, [video_per_scene] * num_scenes)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak(device: torch.device) -> int:
    """Start a peak-memory window; returns the memory in use now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    # Linux: "5" resets the RSS high-water mark (VmHWM) to the current RSS, so import-time
    # peaks do not hide the case's own (ru_maxrss cannot be reset)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _proc_status_bytes("VmRSS")


def _memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")


def make_inputs(args: argparse.Namespace, layout: SceneLayout, backward: bool):
    shape = (1, args.heads, layout.seq_len, args.head_dim)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(args.device).manual_seed(0)
    return [
        torch.randn(shape, generator=gen, device=args.device, dtype=dtype).requires_grad_(backward)
        for _ in range(3)
    ]


def make_step(method: str, qkv, layout: SceneLayout, policy: str, backward: bool) -> Callable:
    """One attention call (and its backward), synchronised."""
    q, k, v = qkv
    mask = build_attention_mask(layout, policy).to(q.device) if method == "dense" else None

    def step() -> None:
        with torch.set_grad_enabled(backward):
            if method == "masked":
                out = masked_attention(q, k, v, layout, policy)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            if backward:
                out.backward(torch.ones_like(out))
                q.grad = k.grad = v.grad = None
        _sync(q.device)

    return step


def measure_memory(args: argparse.Namespace) -> dict:
    """Peak extra bytes of one method (run in a fresh subprocess)."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    layout = make_layout(args.case_len, args.scenes, args.text_len)
    backward = args.case_pass == "fwd+bwd"
    qkv = make_inputs(args, layout, backward)
    make_step(args.case_method, qkv, layout, args.policy, backward)()  # warm-up
    base = _reset_peak(device)
    make_step(args.case_method, qkv, layout, args.policy, backward)()  # the dense mask counts
    return {"peak_bytes": _memory_peak(device) - base}


def memory_in_subprocess(method: str, length: int, pass_: str) -> float | str:
    cmd = [sys.executable, __file__, *sys.argv[1:]]
    cmd += ["--case-method", method, "--case-len", str(length), "--case-pass", pass_]
    # a fixed threshold stops glibc from keeping freed tensors in the heap (it raises the
    # threshold dynamically otherwise), so RSS after the warm-up step is a clean baseline
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        return "error: " + (done.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def measure_times(args, layout: SceneLayout, pass_: str) -> dict[str, float]:
    """Median seconds per method, methods interleaved round-robin."""
    backward = pass_ == "fwd+bwd"
    qkv = make_inputs(args, layout, backward)
    steps = {m: make_step(m, qkv, layout, args.policy, backward) for m in args.methods}
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    for round_ in range(args.warmup + args.repeat):
        for method, step in steps.items():
            start = time.perf_counter()
            step()
            if round_ >= args.warmup:
                times[method].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in times.items()}


def _fmt_mem(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value / 2**20:.0f}"


def _fmt_row(seq_len: int, pass_: str, secs: dict, mems: dict, load: float) -> str:
    cells = [str(seq_len), pass_]
    cells += [f"{secs[m]:.3f}" if m in secs else "-" for m in METHODS]
    cells += [f"{secs[m] / secs['sdpa']:.3f}" if m in secs else "-" for m in ("masked", "dense")]
    cells += [_fmt_mem(mems[m]) if m in mems else "-" for m in METHODS]
    return "| " + " | ".join([*cells, f"{load:.1f}"]) + " |"


def run_all(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    print(
        f"device={args.device} dtype={args.dtype} threads={args.threads} heads={args.heads} "
        f"head_dim={args.head_dim} scenes={args.scenes} text/scene={args.text_len} "
        f"policy={args.policy} B=1 warmup={args.warmup} repeat={args.repeat} (median)"
    )
    print(
        "| L | pass | SDPA s | masked s | dense-mask s | masked/SDPA | dense/SDPA "
        "| SDPA MiB | masked MiB | dense-mask MiB | load (1 min) |"
    )
    print("|" + "---|" * 11)
    for length in args.lengths:
        layout = make_layout(length, args.scenes, args.text_len)
        for pass_ in args.passes:
            secs = measure_times(args, layout, pass_)
            load = os.getloadavg()[0]  # other processes skew CPU timings; say so
            mems = {m: memory_in_subprocess(m, length, pass_) for m in args.methods}
            print(_fmt_row(layout.seq_len, pass_, secs, mems, load), flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--lengths", type=int, nargs="+", default=[6000, 12000])
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--scenes", type=int, default=3)
    p.add_argument("--text-len", type=int, default=226)
    p.add_argument("--policy", default="v2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5)
    # internal: one memory case per subprocess
    p.add_argument("--case-method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--case-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--case-pass", choices=PASSES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if "sdpa" not in args.methods:
        p.error("--methods must include sdpa (ratios are against it)")
    return args


def main() -> None:
    args = parse_args()
    if args.case_method:
        print(json.dumps(measure_memory(args)))
    else:
        run_all(args)


if __name__ == "__main__":
    main()
