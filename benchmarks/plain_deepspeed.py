"""What a user would write instead of m2d: a plain torchrun + DeepSpeed training script.

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/plain_deepspeed.py \
        --model FOLDER --data STORIES.pt --ds-config DS.json --steps 40 --warmup 5 --out R.json

No Ray, no MLflow, no checkpoints, no task mixing: the model from a diffusers folder
wrapped in Mask2DiT (the same compute), DeepSpeed from a JSON config, precomputed
posteriors held in memory (each rank its own list), the v-prediction loss. Rank 0
writes its mean step time after ``--warmup`` steps. The peer of
``benchmarks/train_vs_deepspeed.py``; it reads nothing of m2d but the model class.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--model", "--data", "--ds-config", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    import deepspeed
    from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel

    from mask2dit.model import Mask2DiT

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    deepspeed.init_distributed("gloo")
    rank = torch.distributed.get_rank()
    folder = Path(args.model)
    model = Mask2DiT(CogVideoXTransformer3DModel.from_pretrained(folder / "transformer"))
    scheduler = CogVideoXDDIMScheduler.from_pretrained(folder / "scheduler")
    scaling = json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]
    config = json.loads(Path(args.ds_config).read_text())
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters()], config=config
    )
    stories = torch.load(args.data)[rank]
    g = torch.Generator().manual_seed(rank)

    def step(i: int) -> float:
        means, logvars, text = stories[i % len(stories)]
        scenes = [
            ((m + (0.5 * lv).exp() * torch.randn(m.shape, generator=g)) * scaling).permute(
                0, 2, 1, 3, 4
            )
            for m, lv in zip(means, logvars, strict=True)
        ]
        latents = torch.cat(scenes, dim=1)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        noisy = scheduler.add_noise(latents, noise, t)
        target = scheduler.get_velocity(latents, noise, t)
        pred = engine(noisy, text, t, [s.shape[1] for s in scenes])
        loss = (pred.float() - target.float()).square().mean()
        engine.backward(loss)
        engine.step()
        return loss.item()

    for i in range(args.warmup):
        step(i)
    torch.distributed.barrier()
    started = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    torch.distributed.barrier()
    seconds = (time.perf_counter() - started) / args.steps
    if rank == 0:
        Path(args.out).write_text(json.dumps({"step_s": seconds}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
