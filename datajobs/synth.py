"""``m2d data synth --out DIR`` (``python -m datajobs.synth --spec SYNTH_SPEC``): a small
synthetic multi-scene dataset with recurring characters, for demos and tests; ``--world toy``
writes the toy world instead (``datajobs.toy_synth``).

Each story has one or two "characters" (a colored shape, fixed for the story) that appear
in every shot, moving in a per-shot direction over a per-shot background color. Captions
name characters the way the paper's data does - "Actor1 (a red square)" - repeating the
description verbatim in every shot. Writes real mp4 files plus both manifests:
``pretrain.jsonl`` (one row per shot) and ``sft.jsonl`` (one group of shots per story).
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

import torch

from datajobs.toy_synth import synthesize_toy
from infra.config import StorageConfig
from infra.errors import StorageError, first_line
from infra.job_entry import job_main
from infra.job_specs import SynthSpec
from infra.storage import filesystem, join, write_jsonl
from infra.video import write_video

COLORS = {
    "red": (230, 40, 40),
    "green": (40, 210, 60),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "magenta": (230, 50, 220),
    "cyan": (40, 220, 230),
    "orange": (250, 140, 20),
}
BACKGROUNDS = {
    "blue": (20, 30, 120),
    "dark green": (10, 70, 30),
    "gray": (90, 90, 90),
    "brown": (90, 50, 20),
    "black": (5, 5, 5),
    "purple": (70, 20, 90),
}
SHAPES = ("square", "circle", "diamond")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass(frozen=True)
class Actor:
    """A recurring character: the same color and shape in every shot of its story."""

    color: str
    shape: str

    def describe(self) -> str:
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.shape}"


def _mask(shape: str, height: int, width: int, cy: float, cx: float, r: float) -> torch.Tensor:
    y = torch.arange(height, dtype=torch.float32)[:, None] - cy
    x = torch.arange(width, dtype=torch.float32)[None, :] - cx
    if shape == "square":
        return (x.abs() <= r) & (y.abs() <= r)
    if shape == "circle":
        return x * x + y * y <= r * r
    return x.abs() + y.abs() <= r * 1.3


def render_shot(
    actors: list[Actor],
    moves: list[str],
    background: str,
    frames: int,
    height: int,
    width: int,
    rng: random.Random,
) -> torch.Tensor:
    """uint8 (frames, height, width, 3): each actor glides in its direction.

    Actor i keeps to its own vertical band of the frame, so actors never hide each other.
    """
    band = width / len(actors)
    radius = max(2.0, min(height / 8, band / 5))
    video = torch.empty(frames, height, width, 3, dtype=torch.uint8)
    video[:] = torch.tensor(BACKGROUNDS[background], dtype=torch.uint8)
    paths = [_path(move, i * band, band, height, frames, rng) for i, move in enumerate(moves)]
    for t in range(frames):
        for actor, path in zip(actors, paths, strict=True):
            cy, cx = path(t)
            mask = _mask(actor.shape, height, width, cy, cx, radius)
            video[t][mask] = torch.tensor(COLORS[actor.color], dtype=torch.uint8)
    return video


def _path(move: str, left: float, band: float, height: int, frames: int, rng: random.Random):
    """t -> (y, x): half the band (or height) of travel over the shot, staying in view."""
    dx, dy = DIRECTIONS[move]
    y0, x0 = _start(height, dy, rng), left + _start(band, dx, rng)
    step_y, step_x = 0.5 * height / max(frames - 1, 1), 0.5 * band / max(frames - 1, 1)
    return lambda t: (y0 + dy * step_y * t, x0 + dx * step_x * t)


def _start(size: float, direction: int, rng: random.Random) -> float:
    # Start on the far side of the way the actor moves; across it, anywhere central.
    if direction:
        return size * (0.75 if direction < 0 else 0.25)
    return size * rng.uniform(0.35, 0.65)


def caption(actors: list[Actor], moves: list[str], background: str) -> str:
    """The shot's caption, e.g. "Actor1 (a red square) moves left on a blue background."."""
    parts = [
        f"Actor{i + 1} ({a.describe()}) moves {m}"
        for i, (a, m) in enumerate(zip(actors, moves, strict=True))
    ]
    return f"{' and '.join(parts)} on a {background} background."


def _story_cast(rng: random.Random) -> list[Actor]:
    # Distinct colors, so each character is identifiable by color alone.
    colors = rng.sample(sorted(COLORS), rng.choice((1, 2)))
    return [Actor(color, rng.choice(SHAPES)) for color in colors]


def synthesize(
    out: str,
    stories: int,
    scenes: int = 3,
    frames: int = 17,
    height: int = 32,
    width: int = 32,
    seed: int = 0,
    shots: int | None = None,
    fps: float = 8.0,
    storage: StorageConfig | None = None,
) -> dict[str, int]:
    """Write the dataset under ``out`` (a new or empty folder, or URI prefix); returns
    counts. Deterministic."""
    shots = shots or scenes + 1
    if stories < 1 or scenes < 1 or frames < 1 or shots < scenes:
        raise ValueError("need stories >= 1, scenes >= 1, frames >= 1 and shots >= scenes")
    _check_empty(out, storage)
    rows, groups = [], []
    for index in range(stories):
        story_id = f"story{index:03d}"
        group = _write_story(
            out,
            story_id,
            random.Random(f"synth:{seed}:{index}"),
            shots,
            frames,
            height,
            width,
            fps,
            storage,
        )
        rows.extend(group)
        groups.append({"id": story_id, "shots": group})
    write_jsonl(join(out, "pretrain.jsonl"), rows, storage)
    write_jsonl(join(out, "sft.jsonl"), groups, storage)
    return {"stories": stories, "shots": len(rows)}


def _check_empty(out: str, storage: StorageConfig | None) -> None:
    """Refuse a folder that holds anything: a dataset or a user's files are never
    overwritten."""
    fs, path = filesystem(out, storage)
    try:
        if not fs.exists(path):
            fs.makedirs(path, exist_ok=True)  # a folder it cannot create: said here, in one line
            return
        if not fs.isdir(path):
            raise StorageError(f"--out {out} is a file; give a new folder")
        held = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)]
    except OSError as exc:
        raise StorageError(
            f"--out {out}: cannot use it ({first_line(exc)}); give a folder you can write"
        ) from None
    if held:
        shown = ", ".join(sorted(held)[:3]) + (", ..." if len(held) > 3 else "")
        raise StorageError(
            f"--out {out} is not empty ({shown}); synthesize into a new folder "
            "(nothing there is overwritten)"
        )


def _write_story(out, story_id, rng, shots, frames, height, width, fps, storage) -> list[dict]:
    actors = _story_cast(rng)
    rows = []
    for shot in range(shots):
        background = rng.choice(sorted(BACKGROUNDS))
        moves = [rng.choice(sorted(DIRECTIONS)) for _ in actors]
        video = render_shot(actors, moves, background, frames, height, width, rng)
        path = f"videos/{story_id}/shot{shot}.mp4"
        write_video(join(out, path), video, fps, storage)
        rows.append(
            {
                "path": path,
                "caption": caption(actors, moves, background),
                "num_frames": frames,
                "fps": fps,
                "width": width,
                "height": height,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """The job entry point: a ``SynthSpec`` in, the dataset written."""
    return job_main(SynthSpec, _run, argv)


def _run(spec: SynthSpec) -> None:
    storage = spec.storage or StorageConfig(root=spec.out)
    if spec.world == "toy":
        _check_empty(spec.out, storage)
        counts = synthesize_toy(
            spec.out,
            spec.stories,
            spec.held_out,
            spec.shots or spec.scenes,
            spec.frames,
            spec.height,
            spec.width,
            seed=spec.seed,
            fps=spec.fps,
            storage=storage,
        )
        print(
            f"wrote {counts['stories']} toy stories ({counts['shots']} scenes) and "
            f"{counts['held_out']} held-out evaluation stories to {spec.out}"
        )
        return
    counts = synthesize(
        spec.out,
        spec.stories,
        spec.scenes,
        spec.frames,
        spec.height,
        spec.width,
        seed=spec.seed,
        shots=spec.shots,
        fps=spec.fps,
        storage=storage,
    )
    print(f"wrote {counts['stories']} stories, {counts['shots']} shots to {spec.out}")


if __name__ == "__main__":
    sys.exit(main())
