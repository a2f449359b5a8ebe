"""The toy world: stories small enough to learn on 2 CPU cores, and scored exactly.

One definition serves both sides: ``m2d data synth --world toy`` draws and renders its
stories from here, and the oracle (``evaluation.toy_oracle``) reads rendered or generated
frames back into the same attributes. Nothing here is learned.

A story has n scenes. The *story* owns a background - a colour and a texture - that no
prompt mentions. Each *scene* owns one object - its colour, shape and motion - that its
prompt names ("a red square moves left"); the scenes of a story name different colours,
shapes and motions. Why only cross-scene attention can make the backgrounds agree: the
background is drawn per story, uniformly and independently of every word of every
prompt. A scene generated from its own prompt alone (the ``isolated`` policy: n
independent generations) can only draw a background from the marginal, so two of its
scenes agree at chance (1 / ``len(BACKGROUNDS)``). Agreement above chance needs a scene
to see the other scenes' video while it is generated - the video-video blocks that
``v2`` and ``full`` open. Conversely, naming the right object is a per-scene binding of
text to video: ``v2`` keeps each scene's video on its own prompt, ``full`` lets it see
every prompt, whose tokens carry no scene identity (docs/method.md §9), so an object can
leak from one scene's prompt into another scene.

Pixels: uint8 (frames, height, width, 3). Backgrounds are dark, objects bright, so every
pixel is nearer one of the two palettes; a texture alternates a background's colour with
its half-bright shade.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "MOTIONS",
    "SHAPES",
    "TEXTURES",
    "VOCABULARY",
    "Scene",
    "Story",
    "all_combinations",
    "draw_story",
    "prompt",
    "render_scene",
    "shape_mask",
    "split_stories",
    "texture_mask",
]

#: Object colours (bright): what a prompt names.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (240, 40, 40),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "cyan": (40, 220, 230),
}
#: Background colours (dark): never named. The shade of a texture is half of each.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "navy": (30, 40, 150),
    "forest": (20, 120, 50),
    "maroon": (140, 30, 40),
    "gray": (110, 110, 110),
}
TEXTURES = ("flat", "stripes", "checker")
SHAPES = ("square", "bar", "pillar", "dot")
MOTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}

#: Every word a toy prompt uses, in a fixed order (the toy text encoder's vocabulary).
VOCABULARY: tuple[str, ...] = ("a", "moves", *COLORS, *SHAPES, *MOTIONS)

#: Half the side of an object's box, in pixels (the box is 2r + 1 wide).
OBJECT_RADIUS = 3
#: How far an object travels over a scene, as a share of the frame.
TRAVEL = 0.4


@dataclass(frozen=True)
class Scene:
    """One scene's object: what its prompt names."""

    color: str
    shape: str
    motion: str


@dataclass(frozen=True)
class Story:
    """A story: a background no prompt names, and one object per scene."""

    background: str
    texture: str
    scenes: tuple[Scene, ...]

    def prompts(self) -> list[str]:
        return [prompt(scene) for scene in self.scenes]


def prompt(scene: Scene) -> str:
    """A scene's prompt, e.g. "a red square moves left"."""
    return f"a {scene.color} {scene.shape} moves {scene.motion}"


def draw_story(rng: random.Random, num_scenes: int) -> Story:
    """A story drawn uniformly: any background and texture; per scene a colour, shape and
    motion, each different from the other scenes' (so at most 4 scenes)."""
    if not 1 <= num_scenes <= len(COLORS):
        raise ValueError(f"a toy story has 1 to {len(COLORS)} scenes, not {num_scenes}")
    colors = rng.sample(list(COLORS), num_scenes)
    shapes = rng.sample(SHAPES, num_scenes)
    motions = rng.sample(list(MOTIONS), num_scenes)
    return Story(
        background=rng.choice(list(BACKGROUNDS)),
        texture=rng.choice(TEXTURES),
        scenes=tuple(Scene(*attrs) for attrs in zip(colors, shapes, motions, strict=True)),
    )


def split_stories(
    seed: int, train: int, held_out: int, num_scenes: int
) -> tuple[list[Story], list[Story]]:
    """``train`` training stories and ``held_out`` evaluation stories, deterministic.

    No evaluation story's combination (background, texture and its scenes' objects)
    occurs in training, and no two evaluation stories are the same; every single
    attribute value does occur in training.
    """
    rng = random.Random(f"toy-world:{seed}")
    training = [draw_story(rng, num_scenes) for _ in range(train)]
    seen, evaluation = set(training), []
    for _ in range(1000 * max(held_out, 1)):
        if len(evaluation) == held_out:
            break
        story = draw_story(rng, num_scenes)
        if story not in seen:
            seen.add(story)
            evaluation.append(story)
    else:
        raise ValueError(f"cannot draw {held_out} unseen evaluation stories")
    return training, evaluation


def texture_mask(texture: str, height: int, width: int) -> torch.Tensor:
    """bool (height, width): where a texture puts the shade instead of the colour."""
    y = torch.arange(height)[:, None]
    x = torch.arange(width)[None, :]
    if texture == "flat":
        return torch.zeros(height, width, dtype=torch.bool)
    if texture == "stripes":  # horizontal bands 2 pixels high
        return ((y // 2) % 2 == 1).expand(height, width)
    if texture == "checker":  # 4 x 4 blocks
        return ((y // 4 + x // 4) % 2 == 1).expand(height, width)
    raise ValueError(f"unknown texture {texture!r}; valid: {', '.join(TEXTURES)}")


def shape_mask(shape: str, height: int, width: int, cy: float, cx: float) -> torch.Tensor:
    """bool (height, width): the shape's pixels with its centre at (cy, cx)."""
    r = OBJECT_RADIUS
    y = torch.arange(height, dtype=torch.float32)[:, None] - cy
    x = torch.arange(width, dtype=torch.float32)[None, :] - cx
    ay, ax = y.abs(), x.abs()
    inside = (ay <= r + 0.5) & (ax <= r + 0.5)
    if shape == "square":
        return inside
    if shape == "bar":  # wide and flat
        return inside & (ay <= 1)
    if shape == "pillar":  # tall and thin
        return inside & (ax <= 1)
    if shape == "dot":
        return (ay <= 1) & (ax <= 1)
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def object_path(
    motion: str, frames: int, height: int, width: int, rng: random.Random
) -> list[tuple[float, float]]:
    """(cy, cx) per frame: ``TRAVEL`` of the frame in the motion's direction, centred, with
    a random offset across it; the object stays in view."""
    dy, dx = MOTIONS[motion]
    along = TRAVEL * (height if dy else width)
    cy0 = (height - 1) / 2 - dy * along / 2
    cx0 = (width - 1) / 2 - dx * along / 2
    slack = max(0.0, min(height, width) / 2 - OBJECT_RADIUS - 2)
    offset = rng.uniform(-slack, slack)
    cy0, cx0 = (cy0, cx0 + offset) if dy else (cy0 + offset, cx0)
    step = along / max(frames - 1, 1)
    return [(cy0 + dy * step * t, cx0 + dx * step * t) for t in range(frames)]


def render_scene(
    story: Story,
    index: int,
    frames: int,
    height: int,
    width: int,
    rng: random.Random,
) -> torch.Tensor:
    """uint8 (frames, height, width, 3): scene ``index`` of ``story``."""
    scene = story.scenes[index]
    base = torch.tensor(BACKGROUNDS[story.background], dtype=torch.uint8)
    background = base.expand(height, width, 3).clone()
    background[texture_mask(story.texture, height, width)] = base // 2
    video = background.expand(frames, height, width, 3).clone()
    color = torch.tensor(COLORS[scene.color], dtype=torch.uint8)
    for t, (cy, cx) in enumerate(object_path(scene.motion, frames, height, width, rng)):
        video[t][shape_mask(scene.shape, height, width, round(cy), round(cx))] = color
    return video


def all_combinations(num_scenes: int) -> int:
    """How many distinct stories of ``num_scenes`` scenes the world holds."""
    backgrounds = len(BACKGROUNDS) * len(TEXTURES)
    per_scene = 1
    for values in (COLORS, SHAPES, MOTIONS):
        count = len(values)
        for k in range(num_scenes):
            per_scene *= count - k
    return backgrounds * per_scene
