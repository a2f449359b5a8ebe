"""The toy world on disk (`m2d data synth --world toy`): what each file holds, read back
through m2d's own readers, against the world's definition (evaluation.toy_world)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from datajobs.toy_synth import synthesize_toy
from evaluation.toy_world import (
    BACKGROUNDS,
    COLORS,
    MOTIONS,
    SHAPES,
    TEXTURES,
    VOCABULARY,
    Scene,
    Story,
    render_scene,
    split_stories,
    texture_mask,
)
from infra.prompts import read_stories
from infra.video import read_frames
from orchestrator.cli import cli


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy")
    synthesize_toy(str(out), 12, 4, 3, 5, 16, 16, seed=3, fps=8.0, storage=None)
    return out


def test_held_out_stories_are_combinations_never_trained_on():
    training, evaluation = split_stories(seed=0, train=400, held_out=50, num_scenes=3)
    assert len(evaluation) == len(set(evaluation)) == 50
    assert not set(evaluation) & set(training)
    # ... while every single value of every attribute is trained on
    assert {s.background for s in training} == set(BACKGROUNDS)
    assert {s.texture for s in training} == set(TEXTURES)
    scenes = [scene for story in training for scene in story.scenes]
    assert {s.color for s in scenes} == set(COLORS)
    assert {s.shape for s in scenes} == set(SHAPES)
    assert {s.motion for s in scenes} == set(MOTIONS)


def test_the_scenes_of_a_story_name_different_objects_in_the_worlds_words():
    training, _ = split_stories(seed=1, train=200, held_out=0, num_scenes=4)
    for story in training:
        for attribute in ("color", "shape", "motion"):
            values = [getattr(scene, attribute) for scene in story.scenes]
            assert len(set(values)) == len(values), (attribute, story)
        for prompt in story.prompts():
            assert set(prompt.split()) <= set(VOCABULARY)


def test_the_background_is_shared_by_a_storys_scenes_and_named_by_no_prompt():
    story = Story("maroon", "checker", (Scene("red", "dot", "up"), Scene("cyan", "bar", "left")))
    rng = random.Random(0)
    first, second = (render_scene(story, i, 5, 16, 16, rng) for i in range(2))
    # The corners are background in both scenes (objects stay central): the same pixels.
    assert torch.equal(first[:, :2, :2], second[:, :2, :2])
    shade = texture_mask("checker", 16, 16)
    base = torch.tensor(BACKGROUNDS["maroon"], dtype=torch.uint8)
    assert torch.equal(first[0, 0, 0], base) and not shade[0, 0]
    assert torch.equal(first[0, 0, 4], base // 2) and shade[0, 4]
    for prompt in story.prompts():
        assert not {"maroon", "checker", *BACKGROUNDS, *TEXTURES} & set(prompt.split())


def test_sft_groups_are_whole_stories_and_pretrain_clips_single_scenes(toy):
    records = {r["id"]: r for r in _lines(toy / "stories.jsonl")}
    groups = _lines(toy / "sft.jsonl")
    clips = _lines(toy / "pretrain.jsonl")
    assert len(groups) == 12 and len(clips) == 36
    assert clips == [shot for group in groups for shot in group["shots"]]
    for group in groups:
        record = records[group["id"]]
        assert record["split"] == "train"
        story = Story(
            record["background"], record["texture"], tuple(Scene(**s) for s in record["scenes"])
        )
        assert [shot["caption"] for shot in group["shots"]] == story.prompts()
        corners = [read_frames(str(toy / shot["path"]), [0])[0, 0, 0] for shot in group["shots"]]
        assert all(torch.equal(c, corners[0]) for c in corners)


def test_videos_decode_to_the_rendered_frames_exactly(toy):
    group = _lines(toy / "sft.jsonl")[0]
    record = next(r for r in _lines(toy / "stories.jsonl") if r["id"] == group["id"])
    story = Story(
        record["background"], record["texture"], tuple(Scene(**s) for s in record["scenes"])
    )
    rng = random.Random(f"toy-render:3:{group['id']}")
    for index, shot in enumerate(group["shots"]):
        expected = render_scene(story, index, 5, 16, 16, rng)
        assert torch.equal(read_frames(str(toy / shot["path"]), list(range(5))), expected)


def test_evaluation_files_are_prompt_files_of_the_held_out_stories(toy):
    held_out = [r for r in _lines(toy / "stories.jsonl") if r["split"] == "eval"]
    fixed = read_stories(str(toy / "eval.jsonl"))
    extend = read_stories(str(toy / "eval_extend.jsonl"))
    assert [s.id for s in fixed] == [s.id for s in extend] == [r["id"] for r in held_out]
    for story, record in zip(extend, held_out, strict=True):
        assert len(story.prompts) == 3 and len(story.context_videos) == 2
        assert all(Path(video).is_file() for video in story.context_videos)
        assert story.prompts[0].split()[1] == record["scenes"][0]["color"]


def test_synth_toy_through_the_cli_is_deterministic(tmp_path):
    def synth(out: Path) -> dict[str, bytes]:
        args = ["data", "synth", "--world", "toy", "--out", str(out), "--stories", "3"]
        result = CliRunner().invoke(cli, [*args, "--held-out", "2", "--seed", "7"])
        assert result.exit_code == 0, result.output
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    first, second = synth(tmp_path / "a"), synth(tmp_path / "b")
    assert first == second
    assert "eval_extend.jsonl" in first and "videos/eval/eval001/shot2.mp4" in first


def test_pretraining_reads_whole_toy_clips_only_with_the_whole_span(toy):
    from infra.config import DataConfig
    from infra.errors import DataError
    from trainer.data.loader import StoryLoader
    from trainer.data.manifest import read_clips
    from trainer.data.order import PretrainOrder

    clips, _ = read_clips(str(toy / "pretrain.jsonl"))
    span = DataConfig(pretrain_span=(0.0, 1.0)).clip_span("pretrain")
    story = next(StoryLoader(PretrainOrder(clips, 3, seed=0), 5, 16, 16, "pretrain", span=span))
    for clip, video in zip(story.story.clips, story.videos, strict=True):
        assert torch.equal(
            torch.as_tensor(video).permute(0, 2, 3, 1), read_frames(clip.path, list(range(5)))
        )
    # The paper's 5%-95% leaves 3 of a 5-frame clip's frames: every story is skipped.
    paper = StoryLoader(
        PretrainOrder(clips, 3, seed=0), 5, 16, 16, "pretrain", max_consecutive_skips=3
    )
    with pytest.raises(DataError, match="too_short=3"):
        next(paper)


@pytest.mark.parametrize("span", [(0.5, 0.5), (-0.1, 1.0), (0.2, 1.1)])
def test_a_span_that_holds_no_frames_is_refused(span):
    from pydantic import ValidationError

    from infra.config import DataConfig

    with pytest.raises(ValidationError, match="0 <= start < end <= 1"):
        DataConfig(pretrain_span=span)
