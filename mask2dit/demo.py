"""A toy run of the method core alone: a tiny Mask²DiT learns a 3-scene "story".

`make demo` runs this until the Ray Train job exists (issue 5). One process, no Ray or
DeepSpeed: synthetic latents where every scene shows the same "character" (a fixed
pattern) at a scene-specific brightness, per-scene text embeddings that name the
brightness, the v2 mask, and the SFT task mix (extension with p = 0.5). It prints the
losses of both tasks; they fall as the model learns the story.

    python -m mask2dit.demo [--steps 150]
"""

from __future__ import annotations

import argparse

import torch
from diffusers import CogVideoXDDIMScheduler

from mask2dit.model import Mask2DiT
from mask2dit.presets import COGVIDEOX_SCHEDULER, build_transformer
from mask2dit.tasks import TaskSampler, prepare_training_batch, task_loss

SCENE_FRAMES = (2, 2, 2)
TEXT_TOKENS = 4  # per scene


def _story(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (B, F, 4, 8, 8) and text (B, 3 * TEXT_TOKENS, 16) of random stories."""
    character = torch.randn(batch_size, 1, 4, 8, 8, generator=generator)
    levels = torch.randn(batch_size, len(SCENE_FRAMES), generator=generator)
    frames = torch.repeat_interleave(levels, torch.tensor(SCENE_FRAMES), dim=1)
    latents = character + frames[:, :, None, None, None]
    text = levels.repeat_interleave(TEXT_TOKENS, dim=1)[:, :, None].expand(-1, -1, 16)
    return latents, text.contiguous()


def main(steps: int = 150, batch_size: int = 4, seed: int = 0) -> list[float]:
    """Train for ``steps`` and return the loss of every step."""
    torch.manual_seed(seed)
    model = Mask2DiT(build_transformer("tiny", seed=seed), policy="v2")
    scheduler = CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.03)
    tasks = TaskSampler(p_extension=0.5, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for step in range(steps):
        latents, text = _story(batch_size, generator)
        batch = prepare_training_batch(
            latents, SCENE_FRAMES, tasks.draw(step, batch_size), scheduler, generator
        )
        pred = model(batch.noisy_latents, text, batch.timesteps, SCENE_FRAMES)
        loss = task_loss(pred, batch.target, batch.loss_mask, batch.extension)
        optimizer.zero_grad()
        loss.loss.backward()
        optimizer.step()
        losses.append(loss.loss.item())
        if step % 25 == 0 or step == steps - 1:
            task = "extension" if batch.extension[0] else "normal"
            print(f"step {step:4d}  {task:9s}  loss {losses[-1]:.4f}")
    window = max(1, steps // 5)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"mean loss of the first {window} steps {first:.4f}, of the last {window} {last:.4f}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    main(parser.parse_args().steps)
