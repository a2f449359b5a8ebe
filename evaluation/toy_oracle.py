"""The toy world's exact oracle: frames read back into the attributes a story drew.

No learned weights: every pixel goes to the nearest entry of the toy palette (squared RGB
distance) - an object colour, a background colour, or a background's half-bright shade
(``evaluation.toy_world``: backgrounds are dark, objects bright, so the two lie far
apart). From the labelled pixels, per scene (:func:`read_scene`):

- background: the majority background colour (a colour and its shade vote alike);
- texture: the pattern of ``texture_mask`` that best explains where the shades lie;
- object colour: the object colour with the most pixels, among those *present*: at
  least ``MIN_OBJECT_PIXELS`` of it, counting only pixels in 2 x 2 blocks of it (a noisy
  pixel or a codec's colour fringe is no object), in at least half the frames;
- shape: per frame, the shape whose mask (centred on the object's centroid) has the
  best IoU with the object's pixels; the majority over frames;
- motion: the direction of the larger axis of the centre's least-squares travel over the
  scene; None below ``MIN_TRAVEL`` pixels (a frozen object moves nowhere).

Rendered frames read back exactly, and still do through Gaussian noise of sigma 20 per
channel and through the sampler's lossy H.264 (whose 4:2:0 chroma leaves a 3 x 3 dot its
colour in one 2 x 2 block only): tests/unit/test_toy_oracle.py.

Per story (:func:`score_story`), fractions in [0, 1]:

- ``agreement``: scene pairs whose background colour *and* texture match - what no
  prompt says, so only cross-scene attention can make it agree; ``agreement_color``: the
  colour alone; ``context_agreement`` (extension stories only): each generated scene
  against each given context scene;
- ``color``, ``shape``, ``motion``: scenes whose object matches its own prompt in that
  attribute; ``alignment``: in all three;
- ``leakage``: scenes that show, as an object, a colour another scene's prompt names (an
  object borrowed from a neighbour's prompt). Lower is better.

In an extension story the given context scenes are real clips: the per-scene scores
cover only the generated scenes, and ``agreement`` only the pairs with a generated scene.

Chance levels (:func:`chance`, ``CHANCE`` for the paper's three scenes): what a generator
blind to everything it should use scores - each scene's background drawn uniformly and
independently (that of a scene generated alone, the ``isolated`` policy), each object's
attributes drawn uniformly and independently of its prompt:

- agreement, context agreement: 1 / (4 colours x 3 textures) = 1/12; agreement_color 1/4;
- color, shape, motion: 1/4 each; alignment: (1/4)^3 = 1/64;
- leakage: (n - 1) / 4 for n scenes (its one object's colour is one of the other n - 1
  scenes' colours): 1/2 for three scenes.

Shape legend: T frames, H height, W width. The pixel work is NumPy's: on arrays this
small, torch's intra-op threads cost many times the work itself on shared CPUs.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch

from evaluation.toy_world import (
    BACKGROUNDS,
    COLORS,
    MOTIONS,
    SHAPES,
    TEXTURES,
    Scene,
    shape_mask,
    texture_mask,
)
from infra.errors import DataError

__all__ = [
    "CHANCE",
    "MIN_OBJECT_PIXELS",
    "MIN_TRAVEL",
    "SceneReading",
    "ToyOracle",
    "chance",
    "oracle",
    "parse_prompt",
    "read_scene",
    "score_story",
]

#: Pixels of one colour a frame needs to show it as an object: one 2 x 2 block (what a
#: lossy codec leaves of a 3 x 3 dot's colour; noise makes no such block).
MIN_OBJECT_PIXELS = 4
#: Pixels the object's centre must travel over a scene to have a motion (the world moves
#: it 40% of the frame: 6.4 pixels at 16 x 16).
MIN_TRAVEL = 1.5

_OBJECTS = tuple(COLORS)
_BACKGROUNDS = tuple(BACKGROUNDS)
# Palette rows: the object colours, then the background colours, then their shades
# (``toy_world.render_scene`` halves a background's uint8 channels for its shade).
_PALETTE = np.array(
    [
        *COLORS.values(),
        *BACKGROUNDS.values(),
        *(tuple(channel // 2 for channel in rgb) for rgb in BACKGROUNDS.values()),
    ],
    dtype=np.float32,
)
_FIRST_BACKGROUND = len(_OBJECTS)
_FIRST_SHADE = _FIRST_BACKGROUND + len(_BACKGROUNDS)
_PROMPT = re.compile(r"a (\w+) (\w+) moves (\w+)")


@dataclass(frozen=True)
class SceneReading:
    """What the oracle reads in one scene; None where it cannot tell."""

    background: str | None
    texture: str | None
    color: str | None
    shape: str | None
    motion: str | None
    #: Every object colour present: ``MIN_OBJECT_PIXELS`` of it, in 2 x 2 blocks, in at
    #: least half the frames.
    colors: frozenset[str]


def parse_prompt(prompt: str) -> Scene:
    """The scene a toy prompt names ("a red square moves left"); DataError otherwise."""
    found = _PROMPT.fullmatch(prompt.strip())
    if found is None or not (found[1] in COLORS and found[2] in SHAPES and found[3] in MOTIONS):
        raise DataError(
            f"prompt {prompt!r} is not a toy-world prompt ('a <colour> <shape> moves "
            "<direction>'); the toy oracle scores only stories of the toy world"
        )
    return Scene(found[1], found[2], found[3])


def _labels(frames_THWC: torch.Tensor) -> np.ndarray:
    """int (T, H, W): each pixel's nearest palette row."""
    frames = torch.as_tensor(frames_THWC)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise DataError(f"expected frames shaped (T, H, W, 3), got {tuple(frames.shape)}")
    if frames.is_floating_point():  # [0, 1], as the pipeline's float frames are
        frames = frames * 255
    pixels = frames.detach().cpu().float().numpy().reshape(-1, 1, 3)
    distances = ((pixels - _PALETTE) ** 2).sum(axis=-1)
    return distances.argmin(axis=-1).reshape(frames.shape[:3])


def _read_background(labels_THW: np.ndarray) -> tuple[str | None, str | None]:
    """(background colour, texture) from the pixels labelled background or shade."""
    background = labels_THW >= _FIRST_BACKGROUND
    if not background.any():
        return None, None
    votes = (labels_THW[background] - _FIRST_BACKGROUND) % len(_BACKGROUNDS)
    color = _BACKGROUNDS[int(np.bincount(votes).argmax())]
    shade = (labels_THW >= _FIRST_SHADE)[background]
    height, width = labels_THW.shape[1:]
    fits = []
    for texture in TEXTURES:
        pattern = np.broadcast_to(texture_mask(texture, height, width).numpy(), background.shape)
        fits.append(float(np.mean(pattern[background] == shade)))
    return color, TEXTURES[fits.index(max(fits))]


def _opened(mask_THW: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` that lie in some 2 x 2 block of it: every toy object is at
    least 3 pixels wide, so a rendered one loses nothing, while a scattered noisy pixel
    or a one-pixel colour fringe of a lossy codec (chroma kept per 2 x 2 block) is gone."""
    block = (
        mask_THW[:, :-1, :-1] & mask_THW[:, 1:, :-1] & mask_THW[:, :-1, 1:] & mask_THW[:, 1:, 1:]
    )
    kept = np.zeros_like(mask_THW)
    for dy in (0, 1):
        for dx in (0, 1):
            kept[:, dy : dy + block.shape[1], dx : dx + block.shape[2]] |= block
    return kept


def _objects(labels_THW: np.ndarray) -> dict[str, np.ndarray]:
    """The masks (T, H, W) of the object colours present (``MIN_OBJECT_PIXELS`` in at
    least half the frames), most pixels first."""
    frames = labels_THW.shape[0]
    present = []
    for index, name in enumerate(_OBJECTS):
        mask = _opened(labels_THW == index)
        per_frame = mask.reshape(frames, -1).sum(axis=1)
        if 2 * int((per_frame >= MIN_OBJECT_PIXELS).sum()) >= frames:
            present.append((int(per_frame.sum()), name, mask))
    return {name: mask for _, name, mask in sorted(present, key=lambda found: -found[0])}


def _centres(mask_THW: np.ndarray) -> list[tuple[int, float, float]]:
    """(frame, row, column) of the object's centroid in each frame that shows it."""
    centres = []
    for t, mask in enumerate(mask_THW):
        if int(mask.sum()) >= MIN_OBJECT_PIXELS:
            rows, columns = np.nonzero(mask)
            centres.append((t, float(rows.mean()), float(columns.mean())))
    return centres


def _read_shape(mask_THW: np.ndarray, centres: list[tuple[int, float, float]]) -> str | None:
    """The shape that best fits the object's pixels in most frames."""
    height, width = mask_THW.shape[1:]
    votes: Counter[str] = Counter()
    for t, cy, cx in centres:
        mask = mask_THW[t]
        fits = []
        for shape in SHAPES:
            template = shape_mask(shape, height, width, cy, cx).numpy()
            fits.append(int((template & mask).sum()) / int((template | mask).sum()))
        votes[SHAPES[fits.index(max(fits))]] += 1
    return votes.most_common(1)[0][0] if votes else None


def _read_motion(centres: list[tuple[int, float, float]]) -> str | None:
    """The direction of the centre's travel (least-squares slope times the frames it
    spans) along its larger axis; None when it travels under ``MIN_TRAVEL``."""
    if len(centres) < 2:
        return None
    t, rows, columns = np.array(centres, dtype=np.float64).T
    t = t - t.mean()
    span = float(t.max() - t.min())
    travel_y = float((t * rows).sum() / (t * t).sum()) * span
    travel_x = float((t * columns).sum() / (t * t).sum()) * span
    if max(abs(travel_y), abs(travel_x)) < MIN_TRAVEL:
        return None
    if abs(travel_y) >= abs(travel_x):
        direction = (1 if travel_y > 0 else -1, 0)
    else:
        direction = (0, 1 if travel_x > 0 else -1)
    return next(name for name, step in MOTIONS.items() if step == direction)


def read_scene(frames_THWC: torch.Tensor) -> SceneReading:
    """What one scene shows: uint8 (or float in [0, 1]) frames (T, H, W, 3)."""
    labels = _labels(frames_THWC)
    background, texture = _read_background(labels)
    objects = _objects(labels)
    if not objects:
        return SceneReading(background, texture, None, None, None, frozenset())
    color, mask = next(iter(objects.items()))
    centres = _centres(mask)
    return SceneReading(
        background, texture, color, _read_shape(mask, centres), _read_motion(centres),
        frozenset(objects),
    )  # fmt: skip


def _mean(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _agreement(
    readings: list[SceneReading], pairs: list[tuple[int, int]], texture: bool = True
) -> float | None:
    """The share of ``pairs`` of scenes that read the same background colour (and texture);
    a scene without a background agrees with none."""
    return _mean(
        [
            readings[i].background is not None
            and readings[i].background == readings[j].background
            and (not texture or readings[i].texture == readings[j].texture)
            for i, j in pairs
        ]
    )


def _leaks(reading: SceneReading, wanted: list[Scene], index: int) -> bool:
    """Whether scene ``index`` shows a colour only another scene's prompt names."""
    others = {scene.color for j, scene in enumerate(wanted) if j != index}
    return bool(reading.colors & (others - {wanted[index].color}))


def score_story(
    scenes_THWC: list[torch.Tensor], prompts: list[str], context_scenes: int = 0
) -> dict[str, float | None]:
    """One story's scores (fractions; None where no scene or pair counts) from its scenes'
    frames and prompts, same order; the first ``context_scenes`` were given, not made."""
    wanted = [parse_prompt(prompt) for prompt in prompts]
    if len(scenes_THWC) != len(wanted):
        raise DataError(f"{len(scenes_THWC)} scenes but {len(wanted)} prompts; one each")
    if not 0 <= context_scenes <= len(wanted):
        raise DataError(f"{context_scenes} context scenes in a story of {len(wanted)}")
    readings = [read_scene(frames) for frames in scenes_THWC]
    made = range(context_scenes, len(readings))
    pairs = [(i, j) for i, j in combinations(range(len(readings)), 2) if j in made]
    hits = {
        attribute: [getattr(readings[i], attribute) == getattr(wanted[i], attribute) for i in made]
        for attribute in ("color", "shape", "motion")
    }
    scores = {
        "agreement": _agreement(readings, pairs),
        "agreement_color": _agreement(readings, pairs, texture=False),
        **{attribute: _mean(found) for attribute, found in hits.items()},
        "alignment": _mean([all(found) for found in zip(*hits.values(), strict=True)]),
        "leakage": _mean([_leaks(readings[i], wanted, i) for i in made]),
    }
    if context_scenes:
        given = range(context_scenes)
        scores["context_agreement"] = _agreement(readings, [(j, i) for i in made for j in given])
    return scores


def chance(num_scenes: int) -> dict[str, float]:
    """Each score's chance level for stories of ``num_scenes`` scenes (module docstring)."""
    backgrounds = len(BACKGROUNDS) * len(TEXTURES)
    return {
        "agreement": 1 / backgrounds,
        "agreement_color": 1 / len(BACKGROUNDS),
        "context_agreement": 1 / backgrounds,
        "color": 1 / len(COLORS),
        "shape": 1 / len(SHAPES),
        "motion": 1 / len(MOTIONS),
        "alignment": 1 / (len(COLORS) * len(SHAPES) * len(MOTIONS)),
        "leakage": (num_scenes - 1) / len(COLORS),
    }


#: The chance levels of the paper's three-scene stories.
CHANCE = chance(3)


class ToyOracle:
    """The oracle as ``m2d eval`` takes one (``evaluation.encoders.StoryOracle``)."""

    name = "toy-oracle"

    def score_story(
        self, scenes_THWC: list[torch.Tensor], prompts: list[str], context_scenes: int = 0
    ) -> dict[str, float | None]:
        """:func:`score_story`."""
        return score_story(scenes_THWC, prompts, context_scenes)


def oracle(uri: str = "", storage: object = None) -> ToyOracle:
    """``m2d eval --encoder evaluation.toy_oracle:oracle``: the toy oracle; it has no
    weights, so the encoder folder (``uri``) and its store go unused."""
    return ToyOracle()
