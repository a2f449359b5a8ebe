"""Samples/s of the training data path (decode vs precomputed) against the `local` step.

Setup: the ``local`` profile's pretrain run (tiny model, 3 scenes x 9 frames at 32x32,
micro-batch 1, one intra-op thread as ``workers.cpus_per_worker: 1`` gives each worker);
real mp4 stories from ``datajobs.synth`` (17 frames at 32x32, as ``make demo``
writes them); their latents precomputed in-process by ``datajobs.precompute`` (the
same functions the Ray Data job's actors call).

Measured, per micro-batch, in one process:

- ``decode loader``: ``ManifestStories.next()`` - sample, open, seek, decode, resize.
- ``precomputed loader``: ``PrecomputedStories.next()`` - sample, ranged shard reads.
- ``step, on the fly``: what a worker does after the loader on the decode path -
  ``encode_batch`` (VAE per scene, T5 per caption), the task's noise, Mask²DiT forward,
  v loss, backward, gradient clipping, ``torch.optim.AdamW`` - on a decoded batch.
- ``step, precomputed``: the same step from a precomputed batch (``encode_batch`` samples
  the stored posterior instead of running the VAE and T5).

The ratio the target is about: precomputed loader samples/s / precomputed step samples/s
(>= 5: the loader feeds 5x faster than the step consumes). Methods run interleaved
round-robin, each for ``--seconds`` per round, so load from other processes hits them
alike; the median of ``--rounds``.

    python benchmarks/data.py
    python benchmarks/data.py --stories 48 --rounds 7 --seconds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from infra.config import ClusterProfile, RunConfig, resolve_run  # noqa: E402


def local_run(manifest: Path, latents: Path) -> RunConfig:
    """The `local` profile's pretrain run over ``manifest`` and ``latents``."""
    profile = ClusterProfile.model_validate(
        yaml.safe_load((ROOT / "clusters/local.yaml").read_text())
    )
    data = {"pretrain": str(manifest), "pretrain_latents": str(latents)}
    return resolve_run(profile, "local", "pretrain", {"data": data, "storage": {"root": "/tmp"}})


def prepare(run: RunConfig, folder: Path, stories: int, parts) -> None:
    """Synthetic stories under ``folder`` and their precomputed latents."""
    from datajobs import precompute, shard_encoder
    from datajobs.synth import synthesize
    from infra.job_specs import PrecomputeSpec

    r = run.recipe
    synthesize(
        str(folder),
        stories=stories,
        scenes=r.num_scenes,
        frames=17,
        height=r.height,
        width=r.width,
        seed=0,
    )
    # What `m2d data precompute` would encode with, from the same spec the job reads.
    spec = PrecomputeSpec(run=run, manifest=run.data.pretrain, out=run.data.pretrain_latents)
    settings = precompute.settings_from(spec)

    def runner(pending, settings, out, storage, options):
        for name, items in pending:
            shard_encoder.encode_shard(parts, settings, out, name, items, storage)

    precompute.precompute(settings, spec.out, None, None, runner)


def make_step(run: RunConfig, parts) -> Callable[[object, int], None]:
    """One training step from a loader batch, as ``trainer.loop`` does it (no DeepSpeed)."""
    from mask2dit.tasks import TaskMix, prepare_training_batch, task_loss
    from trainer.batches import encode_batch

    r = run.recipe
    params = [p for p in parts.transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=r.learning_rate, betas=r.betas, eps=r.eps, weight_decay=r.weight_decay
    )
    tasks = TaskMix(r.extension_prob, r.seed)

    def step(batch, i: int) -> None:
        generator = torch.Generator().manual_seed(i)
        latents, frames, text = encode_batch(parts, batch, generator, run.model.text_tokens)
        extension = tasks.draw(i, latents.shape[0])
        b = prepare_training_batch(latents, frames, extension, parts.scheduler, generator)
        pred = parts.transformer(b.noisy_latents, text, b.timesteps, frames)
        loss = task_loss(pred, b.target, b.loss_mask, b.extension)
        loss.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, r.gradient_clipping)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def rate(fn: Callable[[int], None], seconds: float, batch_size: int) -> float:
    """Samples/s of calls of ``fn`` for at least ``seconds`` (and at least 3 calls)."""
    start, calls = time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - start < seconds:
        fn(calls)
        calls += 1
    return calls * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stories", type=int, default=24, help="synthetic stories (4 shots)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="per method and round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from trainer.batches import ManifestStories, PrecomputedStories
    from trainer.components import load_training_parts

    with tempfile.TemporaryDirectory(prefix="m2d-bench-data-") as scratch:
        folder = Path(scratch)
        run = local_run(folder / "pretrain.jsonl", folder / "latents")
        r, size = run.recipe, run.deepspeed.micro_batch_per_gpu
        parts = load_training_parts(run.model, None, "cpu", policy=r.mask_policy, seed=r.seed)
        start = time.perf_counter()
        prepare(run, folder, args.stories, parts)
        print(f"precomputed {args.stories * 4} clips in {time.perf_counter() - start:.1f} s")
        decode = ManifestStories(run, run.data.pretrain, 0, 1)
        stored = PrecomputedStories(run, run.data.pretrain_latents, 0, 1)
        step = make_step(run, parts)
        decoded = [decode.next() for _ in range(4)]
        loaded = [stored.next() for _ in range(4)]
        methods = {
            "decode loader": lambda i: decode.next(),
            "precomputed loader": lambda i: stored.next(),
            "step, on the fly": lambda i: step(decoded[i % 4], i),
            "step, precomputed": lambda i: step(loaded[i % 4], i),
        }
        for fn in methods.values():  # warm-up
            rate(fn, 0.0, size)
        results: dict[str, list[float]] = {name: [] for name in methods}
        loads = []
        for _ in range(args.rounds):
            for name, fn in methods.items():
                results[name].append(rate(fn, args.seconds, size))
            loads.append(os.getloadavg()[0])
    report(results, loads, args)


def report(results: dict[str, list[float]], loads: list[float], args) -> None:
    median = {name: statistics.median(values) for name, values in results.items()}
    print(f"\n| path | samples/s (median of {args.rounds}) | min | max |")
    print("|---|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {median[name]:.1f} | {min(values):.1f} | {max(values):.1f} |")
    precomputed = median["precomputed loader"] / median["step, precomputed"]
    decode = median["decode loader"] / median["step, on the fly"]
    print(f"\nprecomputed loader / precomputed step: {precomputed:.1f}x (target >= 5)")
    print(f"decode loader / on-the-fly step: {decode:.1f}x")
    speedup = median["step, precomputed"] / median["step, on the fly"]
    print(f"precomputed step / on-the-fly step: {speedup:.2f}x")
    print(f"load average (1 min) during rounds: {min(loads):.1f}..{max(loads):.1f}")


if __name__ == "__main__":
    main()
