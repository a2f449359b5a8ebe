"""Long videos with known cuts, for measuring shot detection (``datajobs.shots``).

A video is a run of shots; each shot has its own background colour and texture and a
moving square. Consecutive shots differ clearly in colour (a hard cut, the only kind of
boundary). Within shots, the distractors a detector must not take for cuts:

- ``fade``: the shot dims to a quarter of its brightness and back, smoothly;
- ``flash``: two frames blown out towards white (a camera flash, lightning);
- ``motion``: the texture pans 6 pixels a frame and the square moves 8 (fast motion).

``cut_video`` returns the frame indices where a new shot starts: the ground truth.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from infra.config import StorageConfig
from infra.video import write_video

__all__ = ["DISTRACTORS", "cut_video"]

DISTRACTORS = ("none", "fade", "flash", "motion")


def cut_video(
    uri: str,
    seed: int,
    shots: int = 8,
    size: tuple[int, int] = (64, 96),
    fps: float = 24.0,
    storage: StorageConfig | None = None,
) -> list[int]:
    """Write a video of ``shots`` shots (24 to 71 frames each) at ``uri``; the first frame
    of every shot after the first."""
    rng = random.Random(seed)
    frames: list[np.ndarray] = []
    cuts: list[int] = []
    colour = None
    for index in range(shots):
        if index:
            cuts.append(len(frames))
        colour = _new_colour(rng, colour)
        frames += _shot(rng, rng.randrange(24, 72), size, colour, rng.choice(DISTRACTORS))
    write_video(uri, torch.from_numpy(np.stack(frames)), fps, storage)
    return cuts


def _new_colour(rng: random.Random, previous: np.ndarray | None) -> np.ndarray:
    """A background colour far from the previous shot's (L1 >= 150 of 765)."""
    while True:
        colour = np.array([rng.randrange(40, 216) for _ in range(3)], dtype=np.float32)
        if previous is None or np.abs(colour - previous).sum() >= 150:
            return colour


def _shot(
    rng: random.Random, length: int, size: tuple[int, int], colour: np.ndarray, distractor: str
) -> list[np.ndarray]:
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width]
    period = rng.choice([4, 6, 8, 12])
    kind = rng.choice(["stripes", "checker", "noise"])
    if kind == "stripes":
        texture = ((xx // period) % 2).astype(np.float32)
    elif kind == "checker":
        texture = (((xx // period) + (yy // period)) % 2).astype(np.float32)
    else:
        texture = np.array(rng.choices([0.0, 1.0], k=height * width), np.float32).reshape(size)
    contrast = rng.uniform(30, 70)
    square = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
    side = rng.randrange(height // 6, height // 3)
    x, y = rng.uniform(0, width - side), rng.uniform(0, height - side)
    speed = 8.0 if distractor == "motion" else 1.5
    vx, vy = rng.choice([-1, 1]) * speed, rng.choice([-1, 1]) * speed / 2
    pan = 6 if distractor == "motion" else 0
    flash = rng.randrange(5, length - 5)
    frames = []
    for t in range(length):
        image = colour + (np.roll(texture, t * pan, axis=1)[..., None] - 0.5) * contrast
        x, vx = _bounce(x + vx, vx, width - side)
        y, vy = _bounce(y + vy, vy, height - side)
        image[int(y) : int(y) + side, int(x) : int(x) + side] = square
        if distractor == "fade":
            image = image * (1 - 0.75 * np.sin(np.pi * t / (length - 1)))
        if distractor == "flash" and flash <= t < flash + 2:
            image = image * 0.2 + 255 * 0.8
        frames.append(np.clip(image, 0, 255).astype(np.uint8))
    return frames


def _bounce(position: float, velocity: float, limit: float) -> tuple[float, float]:
    if position < 0 or position > limit:
        return min(max(position, 0.0), limit), -velocity
    return position, velocity
