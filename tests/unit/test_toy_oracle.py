"""The toy oracle against answers known in advance: stories rendered by the toy world
read back exactly (also through noise and a lossy codec), hand-made wrong frames fail
each score, the chance levels are what a blind generator scores, and `m2d eval` carries
the oracle's scores into scores.json, metrics.json, stories.csv, MLflow's keys and the
--compare table."""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from dataclasses import replace
from itertools import product

import numpy as np
import pytest
import torch
from sample_items import item_meta, write_meta

from evaluation.toy_oracle import (
    CHANCE,
    SceneReading,
    chance,
    parse_prompt,
    read_scene,
    score_story,
)
from evaluation.toy_world import (
    BACKGROUNDS,
    COLORS,
    MOTIONS,
    SHAPES,
    TEXTURES,
    Scene,
    Story,
    draw_story,
    prompt,
    render_scene,
    shape_mask,
)
from infra.errors import DataError

FRAMES, HEIGHT, WIDTH = 5, 16, 16
PERFECT = {
    "agreement": 1.0,
    "agreement_color": 1.0,
    "color": 1.0,
    "shape": 1.0,
    "motion": 1.0,
    "alignment": 1.0,
    "leakage": 0.0,
}
STORY = Story(
    "navy",
    "checker",
    (Scene("red", "square", "left"), Scene("yellow", "dot", "right"), Scene("cyan", "bar", "up")),
)


def _render(story: Story, seed: int = 0, frames: int = FRAMES, size=(HEIGHT, WIDTH)):
    rng = random.Random(seed)
    return [render_scene(story, i, frames, *size, rng) for i in range(len(story.scenes))]


def _truth(story: Story, index: int) -> SceneReading:
    scene = story.scenes[index]
    return SceneReading(
        story.background, story.texture, scene.color, scene.shape, scene.motion,
        frozenset({scene.color}),
    )  # fmt: skip


def _noisy(frames: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    noise = sigma * torch.randn(frames.shape, generator=generator)
    return (frames.float() + noise).round().clamp(0, 255).to(torch.uint8)


def test_prompts_parse_back_into_their_scenes_and_others_are_refused():
    for attributes in product(COLORS, SHAPES, MOTIONS):
        assert parse_prompt(prompt(Scene(*attributes))) == Scene(*attributes)
    for text in (
        "Actor1 (a red fox) runs through the snow",
        "a purple square moves left",
        "a red circle moves left",
        "a red square moves sideways",
        "a red square moves",
        "",
    ):
        with pytest.raises(DataError, match="not a toy-world prompt"):
            parse_prompt(text)
    with pytest.raises(DataError, match="not a toy-world prompt"):
        score_story(_render(STORY), [*STORY.prompts()[:2], "a dog in a park"])
    with pytest.raises(DataError, match="3 scenes but 2 prompts"):
        score_story(_render(STORY), STORY.prompts()[:2])


def test_rendered_scenes_read_back_exactly_over_every_attribute_value():
    rng, seen = random.Random("oracle"), set()
    for number in range(120):
        story = draw_story(rng, rng.randint(1, 4))
        size = [(16, 16), (16, 24), (32, 32)][number % 3]
        frames = _render(story, seed=number, frames=5 + 4 * (number % 2), size=size)
        for index, scene in enumerate(story.scenes):
            assert read_scene(frames[index]) == _truth(story, index), (story, index, size)
            seen |= {story.background, story.texture, *vars(scene).values()}
        assert score_story(frames, story.prompts()) == {
            **PERFECT,
            **({"agreement": None, "agreement_color": None} if len(frames) == 1 else {}),
        }
    assert seen == {*BACKGROUNDS, *TEXTURES, *COLORS, *SHAPES, *MOTIONS}
    # Float frames in [0, 1], as a pipeline returns them, read the same.
    assert read_scene(frames[0].float() / 255) == _truth(story, 0)


def test_noisy_frames_still_read_back():
    """Gaussian noise of sigma 20 per channel (clamped), on every pixel."""
    rng, generator = random.Random("noise"), torch.Generator().manual_seed(0)
    for number in range(40):
        story = draw_story(rng, 4)
        for index, frames in enumerate(_render(story, seed=number)):
            assert read_scene(_noisy(frames, 20, generator)) == _truth(story, index)


def test_lossy_h264_frames_still_read_back(tmp_path):
    """The sampler's own lossy H.264 (4:2:0 chroma: a 3 x 3 dot keeps its colour in one
    2 x 2 block only, and colour fringes one pixel wide appear around objects)."""
    from infra.video import read_frames, write_video

    rng = random.Random("lossy")
    for number in range(12):
        story = draw_story(rng, 4)
        for index, frames in enumerate(_render(story, seed=number)):
            path = str(tmp_path / f"{number}_{index}.mp4")
            write_video(path, frames, 8)
            decoded = read_frames(path, list(range(FRAMES)))
            assert not torch.equal(decoded, frames)  # the codec did change pixels
            assert read_scene(decoded) == _truth(story, index)


def test_a_different_background_in_one_scene_lowers_agreement():
    frames = _render(STORY)
    other_color = _render(replace(STORY, background="forest"))
    other_texture = _render(replace(STORY, texture="stripes"))
    prompts = STORY.prompts()
    colour_off = score_story([*frames[:2], other_color[2]], prompts)
    assert colour_off == {**PERFECT, "agreement": 1 / 3, "agreement_color": 1 / 3}
    texture_off = score_story([*frames[:2], other_texture[2]], prompts)
    assert texture_off == {**PERFECT, "agreement": 1 / 3}
    assert read_scene(other_texture[2]).texture == "stripes"


@pytest.mark.parametrize("attribute", ["color", "shape", "motion"])
def test_a_wrong_attribute_scores_zero_for_it_alone(attribute):
    values = {"color": COLORS, "shape": SHAPES, "motion": MOTIONS}[attribute]
    for number, scene in enumerate(STORY.scenes):
        for wrong in values:
            if wrong == getattr(scene, attribute):
                continue
            shown = replace(scene, **{attribute: wrong})
            frames = _render(Story("gray", "flat", (shown,)), seed=number)
            scores = score_story(frames, [prompt(scene)])
            assert scores == {
                **PERFECT,
                "agreement": None,
                "agreement_color": None,
                attribute: 0.0,
                "alignment": 0.0,
            }, (scene, wrong)


def test_a_frozen_object_has_no_motion():
    frames = _render(STORY)
    frozen = frames[0][:1].expand_as(frames[0]).clone()
    assert read_scene(frozen) == replace(_truth(STORY, 0), motion=None)
    scores = score_story([frozen, *frames[1:]], STORY.prompts())
    assert scores == {**PERFECT, "motion": 2 / 3, "alignment": 2 / 3}


def test_another_scenes_object_pasted_in_is_leakage():
    frames = _render(STORY)
    prompts = STORY.prompts()
    pasted = frames[0].clone()
    pasted[:, shape_mask("dot", HEIGHT, WIDTH, 1, 1)] = torch.tensor(
        COLORS["yellow"], dtype=torch.uint8
    )
    assert read_scene(pasted) == replace(_truth(STORY, 0), colors=frozenset({"red", "yellow"}))
    assert score_story([pasted, *frames[1:]], prompts) == {**PERFECT, "leakage": 1 / 3}

    swapped = score_story([frames[1], frames[0], frames[2]], prompts)
    thirds = {name: 1 / 3 for name in ("color", "shape", "motion", "alignment")}
    assert swapped == {**PERFECT, **thirds, "leakage": 2 / 3}

    # White is no scene's prompt: a wrong extra object, but no neighbour's.
    pasted[:, shape_mask("dot", HEIGHT, WIDTH, 1, 1)] = torch.tensor(
        COLORS["white"], dtype=torch.uint8
    )
    assert score_story([pasted, *frames[1:]], prompts) == PERFECT


def test_extension_scores_only_the_generated_scenes():
    """The given context scenes are real clips: only the pairs with a generated scene
    count for agreement, only the generated scenes for the per-scene scores."""
    frames = _render(STORY)
    # A context clip of another background with an object no prompt names.
    context = _render(Story("maroon", "checker", (Scene("white", "dot", "down"),)))[0]
    scores = score_story([context, *frames[1:]], STORY.prompts(), context_scenes=1)
    assert scores == {
        **PERFECT,
        "agreement": 1 / 3,
        "agreement_color": 1 / 3,
        "context_agreement": 0.0,
    }
    assert score_story([context, *frames[1:]], STORY.prompts())["color"] == 2 / 3
    wrong_generated = _render(replace(STORY, background="maroon"))[2]
    scores = score_story([*frames[:2], wrong_generated], STORY.prompts(), context_scenes=1)
    assert scores["context_agreement"] == 1 / 2 and scores["agreement"] == 1 / 3
    with pytest.raises(DataError, match="4 context scenes in a story of 3"):
        score_story(frames, STORY.prompts(), context_scenes=4)


def test_chance_levels_are_what_a_blind_generator_scores():
    """Prompts of drawn stories; each scene made blind: its background and object drawn
    uniformly, whatever the prompts say. Every mean within 4.5 standard errors of the
    stated chance level (pairs and scenes are pairwise independent here)."""
    rng, hits, trials = random.Random("blind"), Counter(), Counter()
    for number in range(400):
        prompts, context = draw_story(rng, 3).prompts(), number % 2
        frames = []
        for _ in prompts:
            blind = Story(
                rng.choice(list(BACKGROUNDS)), rng.choice(TEXTURES),
                (Scene(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(MOTIONS))),),
            )  # fmt: skip
            frames.append(render_scene(blind, 0, FRAMES, HEIGHT, WIDTH, rng))
        made = 3 - context  # the per-scene scores count the generated scenes
        units = {"agreement": 3, "agreement_color": 3, "context_agreement": context * made}
        for name, value in score_story(frames, prompts, context_scenes=context).items():
            hits[name] += value * units.get(name, made)
            trials[name] += units.get(name, made)
    assert set(trials) == set(CHANCE)
    assert chance(3) == CHANCE and CHANCE["agreement"] == 1 / 12 and CHANCE["alignment"] == 1 / 64
    for name, level in CHANCE.items():
        error = np.sqrt(level * (1 - level) / trials[name])
        assert abs(hits[name] / trials[name] - level) < 4.5 * error, (name, hits[name], level)


def _sample_item(out, story_id: str, scenes: list[torch.Tensor], prompts: list[str]) -> None:
    """One item of the sample-batch layout, its videos lossy as the sampler writes them."""
    from infra.video import write_video

    folder = out / "toy-step3" / story_id / "0"
    for index, frames in enumerate(scenes):
        write_video(str(folder / f"scene_{index:02d}.mp4"), frames, 8)
    write_meta(folder, item_meta(story_id, prompts, [FRAMES] * len(scenes), "toy-step3", 3, ""))


def test_m2d_eval_carries_the_oracles_scores_into_every_result(tmp_path):
    """The eval job's own code, without Ray: the actor class scores each item, the
    results are written; then MLflow's keys and the --compare table."""
    from evaluation.encoders import load_encoder, oracle_of, text_encoder_of
    from infra.job_specs import EvalSpec
    from orchestrator.commands.eval import comparison, render
    from sampler.eval_job import ItemScorer, collect, find_items, mlflow_metrics, write_results

    encoder = load_encoder("evaluation.toy_oracle:oracle", "")
    assert oracle_of(encoder) is encoder and text_encoder_of(encoder) is None
    frames = _render(STORY)
    _sample_item(tmp_path, "kept", frames, STORY.prompts())
    moved = [*frames[:2], _render(replace(STORY, background="gray"))[2]]
    _sample_item(tmp_path, "moved", moved, STORY.prompts())
    spec = EvalSpec(samples=str(tmp_path), encoder="evaluation.toy_oracle:oracle", encoder_path="")
    items = find_items(spec)
    done = ItemScorer(spec.model_dump_json())(
        {"uri": np.array([u for _, u in items], dtype=object)}
    )
    assert list(done["skipped"]) == ["", ""]
    record = json.loads((tmp_path / "toy-step3" / "kept" / "0" / "scores.json").read_text())
    assert record["scores"] == {"story": "kept", **PERFECT}

    summary = write_results(spec, collect(spec, items, {}))["toy-step3"]
    metrics = json.loads((tmp_path / "toy-step3" / "metrics.json").read_text())["metrics"]
    assert metrics == summary["metrics"] and list(metrics) == list(PERFECT)
    assert metrics["agreement"]["mean"] == pytest.approx((1 + 1 / 3) / 2)
    assert metrics["agreement"]["n"] == 2 and metrics["color"]["mean"] == 1.0
    with (tmp_path / "toy-step3" / "stories.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["seed", "story", *PERFECT, "skipped"]
    assert float(rows[1]["agreement"]) == pytest.approx(1 / 3)
    logged = mlflow_metrics(summary)
    assert logged["eval/agreement"] == metrics["agreement"]["mean"]
    assert logged["eval/leakage_high"] == 0.0 and "eval/visual" not in logged

    table = render(comparison([str(tmp_path)]), "text").splitlines()
    assert table[0].split() == ["checkpoint", "step", "items", *PERFECT, "FVD"]
    assert table[1].split()[:5] == ["toy-step3", "3", "2", "0.67", "[0.33,"]


def test_an_oracle_needs_no_encoder_path_and_a_named_encoder_still_does(tmp_path):
    from types import SimpleNamespace

    from orchestrator.cli import UserError
    from orchestrator.jobs import eval_spec

    workers = SimpleNamespace(num_workers=1, cpus_per_worker=1, gpus_per_worker=0)
    run = SimpleNamespace(workers=workers, storage=None, tracking=None)

    def options(encoder: str) -> dict:
        return {"encoder": encoder, "encoder_path": None, "reference": None, "fvd_path": None}

    spec = eval_spec(run, str(tmp_path), None, None, options("evaluation.toy_oracle:oracle"))
    assert spec.encoder == "evaluation.toy_oracle:oracle" and spec.encoder_path == ""
    with pytest.raises(UserError, match="--encoder-path: give the encoder's folder"):
        eval_spec(run, str(tmp_path), None, None, options("xclip"))
