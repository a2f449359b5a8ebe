"""Training tasks and loss of Mask²DiT (docs/method.md §5).

A *normal* sample noises all scenes with one t and learns v on all of them. An
*extension* sample keeps the context scenes (all but the last) clean, gives their tokens
t = 0, and learns v on the last scene only.

Shape legend: B batch, F latent frames (all scenes), C channels, H/W latent height/width,
n scenes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "TaskLoss",
    "TaskMix",
    "TrainingBatch",
    "prepare_training_batch",
    "task_loss",
]

_MASK64 = (1 << 64) - 1
_TASK_STREAM = 0x6D32645F7461736B  # separates task draws from other seeded streams


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _seed_from(*keys: int) -> int:
    """A well-mixed 63-bit seed from integers (nearby steps give unrelated streams)."""
    h = _TASK_STREAM
    for key in keys:
        h = _splitmix64(h ^ (int(key) & _MASK64))
    return h >> 1


class TaskMix:
    """Chooses the extension task with probability ``p_extension``, reproducibly.

    A draw depends only on ``(seed, step)`` - plus ``rank`` and the sample index when
    ``per_sample`` - never on earlier draws, so a run resumed at step k draws what the
    uninterrupted run drew. Per step (the reference behaviour) the whole global batch
    shares one task, identical on every rank; per sample each sample draws its own.
    """

    def __init__(self, p_extension: float, seed: int, per_sample: bool = False) -> None:
        if not 0.0 <= p_extension <= 1.0:
            raise ValueError(f"p_extension must be in [0, 1], got {p_extension}")
        self.p_extension = float(p_extension)
        self.seed = int(seed)
        self.per_sample = per_sample

    def draw(self, step: int, batch_size: int, rank: int = 0) -> torch.Tensor:
        """(batch_size,) bool, True where the sample is an extension sample at ``step``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not self.per_sample:
            g = torch.Generator().manual_seed(_seed_from(self.seed, step))
            is_extension = bool(torch.rand((), generator=g) < self.p_extension)
            return torch.full((batch_size,), is_extension, dtype=torch.bool)
        g = torch.Generator().manual_seed(_seed_from(self.seed, step, rank))
        return torch.rand(batch_size, generator=g) < self.p_extension


@dataclass
class TrainingBatch:
    """Model inputs and targets of one step (see ``prepare_training_batch``)."""

    noisy_latents: torch.Tensor  # (B, F, C, H, W); extension context frames exactly clean
    timesteps: torch.Tensor  # (B, n) long; extension context scenes 0
    target: torch.Tensor  # (B, F, C, H, W) v-prediction target
    loss_mask: torch.Tensor  # (B, F) bool, frames that enter the loss
    extension: torch.Tensor  # (B,) bool
    noise: torch.Tensor  # (B, F, C, H, W)


def _context_frames(scene_frames: Sequence[int], num_frames: int) -> int:
    """Latent frames before the last scene, after checking ``scene_frames``."""
    scene_frames = [int(f) for f in scene_frames]
    if not scene_frames or min(scene_frames) < 1 or sum(scene_frames) != num_frames:
        raise ValueError(
            f"scene_frames {scene_frames} must be >= 1 each and sum to the {num_frames} frames"
        )
    return num_frames - scene_frames[-1]


def prepare_training_batch(
    latents: torch.Tensor,
    scene_frames: Sequence[int],
    extension: torch.Tensor,
    scheduler: Any,
    generator: torch.Generator | None = None,
) -> TrainingBatch:
    """Noise a batch for the normal / extension tasks.

    ``latents`` (B, F, C, H, W) are the clean scene latents concatenated along F;
    ``extension`` (B,) bool marks extension samples; ``scheduler`` is a CogVideoX DDIM or
    DPM scheduler (its ``add_noise`` / ``get_velocity``). One t ~ U{0 .. T-1} per sample
    and the noise are drawn from ``generator`` on its device.
    """
    if latents.ndim != 5:
        raise ValueError(f"latents must be (B, F, C, H, W), got shape {tuple(latents.shape)}")
    batch_size, num_frames = latents.shape[:2]
    num_scenes = len(scene_frames)
    context_frames = _context_frames(scene_frames, num_frames)
    extension = extension.to(device=latents.device, dtype=torch.bool)
    if extension.shape != (batch_size,):
        raise ValueError(f"extension must have shape ({batch_size},), got {tuple(extension.shape)}")
    if num_scenes < 2 and bool(extension.any()):
        raise ValueError("the extension task needs >= 2 scenes (context and target)")

    gen_device = generator.device if generator is not None else torch.device("cpu")
    num_train = scheduler.config.num_train_timesteps
    t = torch.randint(0, num_train, (batch_size,), generator=generator, device=gen_device)
    # Draw in float32 whatever the latent dtype, so a seed means the same noise everywhere.
    noise = torch.randn(latents.shape, generator=generator, device=gen_device)
    t, noise = t.to(latents.device), noise.to(device=latents.device, dtype=latents.dtype)

    noisy = scheduler.add_noise(latents, noise, t)
    target = scheduler.get_velocity(latents, noise, t)
    is_context_frame = torch.arange(num_frames, device=latents.device) < context_frames
    clean_frames = extension[:, None] & is_context_frame[None, :]  # (B, F)
    noisy = torch.where(clean_frames[:, :, None, None, None], latents, noisy)

    is_context_scene = torch.arange(num_scenes, device=latents.device) < num_scenes - 1
    timesteps = t[:, None].repeat(1, num_scenes)
    timesteps = timesteps.masked_fill(extension[:, None] & is_context_scene[None, :], 0)
    return TrainingBatch(
        noisy_latents=noisy,
        timesteps=timesteps,
        target=target,
        loss_mask=~clean_frames,
        extension=extension,
        noise=noise,
    )


@dataclass
class TaskLoss:
    """Total loss (differentiable) and its per-task parts (detached, None when absent)."""

    loss: torch.Tensor
    normal: torch.Tensor | None
    extension: torch.Tensor | None


def task_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor, extension: torch.Tensor
) -> TaskLoss:
    """v-prediction MSE: per sample the mean over its masked frames, then the batch mean.

    Equals the CogVideoX fine-tuning loss (x0 error weighted by 1 / (1 - alpha_bar)), which
    is algebraically the plain v error. Masked-out frames get an exact zero gradient.
    """
    if pred.shape != target.shape or loss_mask.shape != pred.shape[:2]:
        raise ValueError(
            f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and loss_mask "
            f"{tuple(loss_mask.shape)} must agree on (B, F, ...)"
        )
    frame_mse = (pred.float() - target.float()).square().mean(dim=(2, 3, 4))  # (B, F)
    weights = loss_mask.to(frame_mse.dtype)
    per_sample = (frame_mse * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    extension = extension.to(device=per_sample.device, dtype=torch.bool)
    return TaskLoss(
        loss=per_sample.mean(),
        normal=_mean_or_none(per_sample[~extension]),
        extension=_mean_or_none(per_sample[extension]),
    )


def _mean_or_none(x: torch.Tensor) -> torch.Tensor | None:
    return x.detach().mean() if x.numel() else None
