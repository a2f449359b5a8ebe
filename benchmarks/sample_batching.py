"""Batched sampling (issue 28 point 7): items/s of the sample-batch job with ``--batch-size
B`` against one item per model call, side by side on this machine, at the toy and tiny
presets.

Runs the real job (``sampler.job.run``: Ray Data, one actor, the mp4/GIF/PNG/meta.json
writes) on a saved model folder of each preset, with the same stories, seeds and settings
for both batch sizes, and times the steady state: from the end of the first model call
(which also pays for loading the model) to the last item.

    .venv/bin/python benchmarks/sample_batching.py [--stories 8] [--seeds 4] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow
# the `sampler` package it measures.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]

#: Per preset: the model, the stories' prompts, and the sampling size (the toy world's
#: clips; the tiny preset's test size).
PRESETS = {
    "toy": {"frames": 5, "size": (16, 16), "text_tokens": 8},
    "tiny": {"frames": 9, "size": (32, 32), "text_tokens": 16},
}


def write_stories(path: Path, count: int) -> None:
    """Toy-world stories of 3 scenes (their words are the toy tokenizer's vocabulary)."""
    from evaluation.toy_world import draw_story

    rng = random.Random(0)
    lines = []
    for index in range(count):
        prompts = draw_story(rng, 3).prompts()
        lines.append(json.dumps({"id": f"s{index:03d}", "prompts": prompts}))
    path.write_text("\n".join(lines) + "\n")


def save_model(preset: str, folder: Path) -> Path:
    from evaluation.toy_world import VOCABULARY
    from mask2dit.components import save_parts, tiny_parts, toy_parts

    parts = toy_parts(VOCABULARY, 0) if preset == "toy" else tiny_parts(0)
    return save_parts(parts, folder)


def measure(preset: str, folder: Path, prompts: Path, out: Path, batch: int, args) -> float:
    """Steady-state items/s of one job rendering ``batch`` items per model call."""
    from infra.config import ModelConfig, StageRecipe, StorageConfig
    from infra.job_specs import CheckpointSpec, SampleJobSpec
    from sampler.job import run

    setting = PRESETS[preset]
    height, width = setting["size"]
    spec = SampleJobSpec(
        cluster="bench",
        checkpoints=[CheckpointSpec(uri=str(folder), label=preset)],
        prompts=str(prompts),
        out=str(out),
        steps=args.steps,
        guidance=1.0,
        seeds=list(range(args.seeds)),
        frames=setting["frames"],
        height=height,
        width=width,
        num_actors=1,
        cpus_per_actor=args.threads,
        batch_size=batch,
        model=ModelConfig(source=preset, text_tokens=setting["text_tokens"]),
        recipe=StageRecipe(frames=setting["frames"], height=height, width=width),
        storage=StorageConfig(root=str(out)),
    )
    finished: list[float] = []

    def echo(line: str) -> None:
        if line.startswith("["):
            finished.append(time.monotonic())

    run(spec, echo=echo)
    # Rows of one call arrive together: count from the last row of the first call.
    return (len(finished) - batch) / (finished[-1] - finished[batch - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stories", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=4, help="seeds per story")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="the actor's CPU threads")
    parser.add_argument("--presets", default="toy,tiny")
    args = parser.parse_args()
    items = args.stories * args.seeds
    if items < 3 * args.batch_size:
        parser.error("give at least 3 batches of items (stories x seeds)")

    import ray

    from infra.ray_runtime import init_ray

    init_ray(num_cpus=args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="m2d-bench-") as tmp:
        root = Path(tmp)
        prompts = root / "stories.jsonl"
        write_stories(prompts, args.stories)
        for preset in args.presets.split(","):
            folder = save_model(preset, root / preset)
            # Alternate the two sides so a drift of the machine hits both.
            rates = {1: [], args.batch_size: []}
            for attempt in range(2):
                for batch in rates:
                    out = root / f"out-{preset}-{batch}-{attempt}"
                    rates[batch].append(measure(preset, folder, prompts, out, batch, args))
            best = {batch: max(values) for batch, values in rates.items()}
            rows.append((preset, best[1], best[args.batch_size]))
    ray.shutdown()
    load = os.getloadavg()[0]
    print(
        f"{items} items ({args.stories} stories x {args.seeds} seeds, 3 scenes), "
        f"{args.steps} DDIM steps, no guidance, 1 actor with {args.threads} threads; "
        "best of 2 runs each"
    )
    print(f"| preset | items/s, 1 per call | items/s, {args.batch_size} per call | ratio |")
    print("|---|---|---|---|")
    for preset, one, many in rows:
        print(f"| {preset} | {one:.2f} | {many:.2f} | {many / one:.2f}x |")
    print(f"load average (1 min) at the end: {load:.1f}")


if __name__ == "__main__":
    main()
