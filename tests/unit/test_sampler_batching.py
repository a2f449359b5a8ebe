"""Batched sampling (issue 28 point 7) against its reference, one story per call: several
stories and seeds in one model batch give each item the latents and frames it gets alone
(float tolerance: a batched matmul may sum in another order), in fixed and extension
modes, under DDIM and under the DPM sampler that draws noise at every step; each distinct
story's text goes through T5 once.

The one-story path is itself held to stock ``CogVideoXPipeline`` in test_sampler_pipeline.py.
"""

from __future__ import annotations

import pytest
import torch

from mask2dit.sampling.params import SamplingParams
from mask2dit.sampling.pipeline import MultiScenePipeline
from trainer.components import save_tiny_pretrained

PARAMS = SamplingParams(
    num_inference_steps=3,
    guidance_scale=6.0,
    negative_prompt="blurry",
    text_tokens=32,
    num_frames=9,
    height=32,
    width=48,
    output="float",
)
FOX = ["Actor1 (a red fox) runs", "Actor1 (a red fox) sleeps"]
OWL = ["Actor1 (a white owl) flies", "Actor1 (a white owl) lands"]
#: Two seeds of one story and one of another: the batch mixes stories and seeds.
ITEMS = [(FOX, 0), (FOX, 1), (OWL, 0)]
TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_pretrained(tmp_path_factory.mktemp("tiny"))


def _pipe(folder, scheduler: str) -> MultiScenePipeline:
    return MultiScenePipeline.from_pretrained(folder, scheduler=scheduler, policy="v2")


def _seed(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_same(batched, alone) -> None:
    assert len(batched) == len(alone)
    for got, want in zip(batched, alone, strict=True):
        assert got.scene_frames == want.scene_frames
        assert got.context_scenes == want.context_scenes and got.truncated == want.truncated
        torch.testing.assert_close(got.latents, want.latents, **TOLERANCE)
        for got_scene, want_scene in zip(got.frames, want.frames, strict=True):
            torch.testing.assert_close(got_scene, want_scene, **TOLERANCE)
    # The items are not one render repeated: seeds and stories still differ.
    assert not torch.allclose(batched[0].latents, batched[1].latents, atol=1e-3)
    assert not torch.allclose(batched[0].latents, batched[2].latents, atol=1e-3)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_a_batch_of_stories_and_seeds_equals_one_at_a_time(folder, scheduler):
    pipe = _pipe(folder, scheduler)
    alone = [pipe.generate(prompts, PARAMS, generator=_seed(seed)) for prompts, seed in ITEMS]
    batched = pipe.generate_batch(
        [prompts for prompts, _ in ITEMS], PARAMS, generators=[_seed(s) for _, s in ITEMS]
    )
    _assert_same(batched, alone)


def _video(seed: int, frames: int = 9) -> torch.Tensor:
    """A smooth moving gradient, uint8 (T, H, W, 3)."""
    base = torch.rand(3, 4, 6, generator=_seed(seed))
    big = torch.nn.functional.interpolate(base[None], size=(32, 48), mode="bilinear")[0]
    video = torch.stack([big.roll(shifts=t, dims=2) for t in range(frames)])
    return (video.permute(0, 2, 3, 1) * 255).to(torch.uint8)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_a_batch_of_extensions_equals_one_at_a_time(folder, scheduler):
    """Context videos encoded with posterior samples drawn from each item's generator, then
    two new scenes generated one after the other."""
    pipe = _pipe(folder, scheduler)
    prompts = [[*p, "Actor1 looks back"] for p, _ in ITEMS]
    contexts = [[_video(1)], [_video(1)], [_video(2)]]
    seeds = [seed for _, seed in ITEMS]
    alone = [
        pipe.extend(p[:2], c, PARAMS, generator=_seed(s))
        for p, c, s in zip(prompts, contexts, seeds, strict=True)
    ]
    batched = pipe.extend_batch(
        [p[:2] for p in prompts], contexts, PARAMS, generators=[_seed(s) for s in seeds]
    )
    _assert_same(batched, alone)
    # Extension from latents (extend mode without context videos): three scenes from two.
    alone = [
        pipe.extend_latents(p, out.latents, out.scene_frames, PARAMS, generator=_seed(s))
        for p, out, s in zip(prompts, alone, seeds, strict=True)
    ]
    batched = pipe.extend_latents_batch(
        prompts,
        torch.cat([out.latents for out in batched]),
        batched[0].scene_frames,
        PARAMS,
        generators=[_seed(s) for s in seeds],
    )
    _assert_same(batched, alone)
    assert [out.context_scenes for out in batched] == [2, 2, 2]


def test_each_storys_text_is_encoded_once(folder, monkeypatch):
    pipe = _pipe(folder, "ddim")
    calls = []
    forward = pipe.text_encoder.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.text_encoder, "forward", counted)
    pipe.generate_batch([p for p, _ in ITEMS], PARAMS, generators=[_seed(s) for _, s in ITEMS])
    assert len(calls) == 3  # FOX, OWL and the negative prompt


def test_a_batch_needs_one_shape_and_one_generator_per_story(folder):
    pipe = _pipe(folder, "ddim")
    with pytest.raises(ValueError, match="same scene count"):
        pipe.generate_batch([FOX, FOX[:1]], PARAMS)
    with pytest.raises(ValueError, match="1 generators for 2 stories"):
        pipe.generate_batch([FOX, OWL], PARAMS, generators=[_seed(0)])
    with pytest.raises(ValueError, match="context scenes differ"):
        pipe.extend_batch([FOX, OWL], [[_video(0)], [_video(0, frames=17)]], PARAMS)


def test_noise_seeds_are_per_story_and_seed_or_shared():
    from sampler.batch import noise_seed

    seeds = {(story, seed): noise_seed(story, seed, "story") for story in "ab" for seed in (0, 1)}
    assert len(set(seeds.values())) == 4  # no two items of a job start from the same noise
    assert all(0 <= value < 2**63 for value in seeds.values())
    # The same on every machine, in every process (no salted hash()), in every version:
    # sha256 of "story NUL seed", its first 8 bytes little-endian, 63 bits.
    assert noise_seed("eval000", 0, "story") == 0x7B5A68CD7EB34F7F
    assert [noise_seed(story, 3, "shared") for story in "ab"] == [3, 3]
