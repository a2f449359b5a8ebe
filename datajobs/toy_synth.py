"""``m2d data synth --world toy``: the toy world's training and evaluation stories on disk.

The world itself (what a story is, how a scene looks, why only cross-scene attention can
make its backgrounds agree) is ``evaluation.toy_world``; this module writes it in the
formats the rest of m2d reads:

- ``pretrain.jsonl``: every scene of every training story as its own clip. Pre-training
  concatenates unrelated clips, so there a sample's backgrounds do not agree;
- ``sft.jsonl``: one group per training story, its scenes in order (their backgrounds do);
- ``eval.jsonl``: the held-out stories as sample-batch prompt lines (no combination of
  them occurs in training), and ``eval_extend.jsonl``: the same stories with all but their
  last scene given as context videos, for ``sample-batch --mode extend``;
- ``stories.jsonl``: every story's attributes (split, background, texture, objects), the
  ground truth the oracle's chance levels and the experiment's report refer to.

Videos are lossless (``write_video(lossless=True)``): the oracle reads pixels exactly.
"""

from __future__ import annotations

import random
from dataclasses import asdict

from evaluation.toy_world import Story, render_scene, split_stories
from infra.config import StorageConfig
from infra.storage import join, write_jsonl
from infra.video import write_video

__all__ = ["synthesize_toy"]


def synthesize_toy(
    out: str,
    stories: int,
    held_out: int,
    scenes: int,
    frames: int,
    height: int,
    width: int,
    seed: int,
    fps: float,
    storage: StorageConfig | None,
) -> dict[str, int]:
    """Write the toy dataset under ``out`` (already checked empty); returns counts."""
    training, evaluation = split_stories(seed, stories, held_out, scenes)
    size = (frames, height, width)
    groups, records = [], []
    for index, story in enumerate(training):
        story_id = f"story{index:04d}"
        shots = _write_story(out, "train", story_id, story, size, seed, fps, storage)
        groups.append({"id": story_id, "shots": shots})
        records.append(_record(story_id, "train", story))
    prompts, extend = [], []
    for index, story in enumerate(evaluation):
        story_id = f"eval{index:03d}"
        shots = _write_story(out, "eval", story_id, story, size, seed, fps, storage)
        prompts.append({"id": story_id, "prompts": story.prompts()})
        context = [shot["path"] for shot in shots[:-1]]
        extend.append({"id": story_id, "prompts": story.prompts(), "context_videos": context})
        records.append(_record(story_id, "eval", story))
    write_jsonl(join(out, "pretrain.jsonl"), [s for g in groups for s in g["shots"]], storage)
    write_jsonl(join(out, "sft.jsonl"), groups, storage)
    write_jsonl(join(out, "eval.jsonl"), prompts, storage)
    write_jsonl(join(out, "eval_extend.jsonl"), extend, storage)
    write_jsonl(join(out, "stories.jsonl"), records, storage)
    return {"stories": len(training), "shots": len(training) * scenes, "held_out": held_out}


def _write_story(out, split, story_id, story: Story, size, seed, fps, storage) -> list[dict]:
    frames, height, width = size
    # The object's start offset across its motion: drawn per story and scene, seeded.
    rng = random.Random(f"toy-render:{seed}:{story_id}")
    rows = []
    for index, _ in enumerate(story.scenes):
        video = render_scene(story, index, frames, height, width, rng)
        path = f"videos/{split}/{story_id}/shot{index}.mp4"
        write_video(join(out, path), video, fps, storage, lossless=True)
        rows.append(
            {
                "path": path,
                "caption": story.prompts()[index],
                "num_frames": frames,
                "fps": fps,
                "width": width,
                "height": height,
            }
        )
    return rows


def _record(story_id: str, split: str, story: Story) -> dict:
    return {"id": story_id, "split": split, **asdict(story)}
