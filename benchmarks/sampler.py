"""Throughput of the sample-batch job with 1 and 2 actors (issue 6): items/s on CPU.

Runs the real job (``sampler.job.run``: Ray Data, actor pool, mp4/GIF/PNG/meta.json
writes) on a tiny CogVideoX folder, one intra-op thread per actor, and times the steady
state: from the moment every actor has finished its first item to the last item, so
Ray start-up and model loading are left out (they are paid once per job).

    .venv/bin/python benchmarks/sampler.py [--items 24] [--steps 8] [--size 64x64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow
# the `sampler` package it measures.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]


def write_stories(path: Path, count: int) -> None:
    lines = [
        json.dumps({"id": f"s{i:03d}", "prompts": [f"scene one of {i}", f"scene two of {i}"]})
        for i in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")


def measure(folder: Path, prompts: Path, out: Path, actors: int, args) -> float:
    """Steady-state items/s of one job with ``actors`` actors."""
    from infra.config import ModelConfig, StageRecipe, StorageConfig
    from infra.job_specs import CheckpointSpec, SampleJobSpec
    from sampler.job import run

    height, width = (int(v) for v in args.size.split("x"))
    spec = SampleJobSpec(
        cluster="bench",
        checkpoints=[CheckpointSpec(uri=str(folder), label="tiny")],
        prompts=str(prompts),
        out=str(out),
        steps=args.steps,
        frames=args.frames,
        height=height,
        width=width,
        num_actors=actors,
        cpus_per_actor=1,
        model=ModelConfig(source="tiny", text_tokens=16),
        recipe=StageRecipe(frames=args.frames, height=height, width=width),
        storage=StorageConfig(root=str(out)),
    )
    finished: list[float] = []

    def echo(line: str) -> None:
        if line.startswith("["):
            finished.append(time.monotonic())

    run(spec, echo=echo)
    steady = finished[actors - 1 :]
    return (len(steady) - 1) / (steady[-1] - steady[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=24, help="stories (1 seed each)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", default="64x64")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray

    from infra.ray_runtime import init_ray
    from mask2dit.components import save_parts, tiny_parts

    init_ray(num_cpus=2)
    with tempfile.TemporaryDirectory(prefix="m2d-bench-") as tmp:
        root = Path(tmp)
        folder = save_parts(tiny_parts(0), root / "tiny")
        prompts = root / "stories.jsonl"
        write_stories(prompts, args.items)
        rates = {n: measure(folder, prompts, root / f"out{n}", n, args) for n in (1, 2)}
    ray.shutdown()
    load = os.getloadavg()[0]
    print(f"items={args.items} steps={args.steps} frames={args.frames} size={args.size}")
    print("| actors | items/s | speed-up |")
    print("|---|---|---|")
    for n, rate in rates.items():
        print(f"| {n} | {rate:.3f} | {rate / rates[1]:.2f}x |")
    print(f"load average (1 min) at the end: {load:.1f}")


if __name__ == "__main__":
    main()
