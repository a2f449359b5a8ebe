"""The sampler's pipelines against independent references: stock CogVideoXPipeline at n = 1,
direct VAE encode/decode for the extension context, and the sampler's own invariants.

Everything runs on the tiny components (saved as a diffusers folder and loaded back, so the
loading path is real) at 32x48 pixels, 9 frames per scene and 3 denoising steps.
"""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

from mask2dit.sampling.denoise import build_scheduler
from mask2dit.sampling.params import SamplingParams
from mask2dit.sampling.pipeline import MultiScenePipeline
from trainer.components import save_tiny_pretrained

PARAMS = SamplingParams(
    num_inference_steps=3,
    guidance_scale=6.0,
    negative_prompt="blurry, low quality",
    text_tokens=32,
    num_frames=9,
    height=32,
    width=48,
)
PROMPTS = ["Actor1 (a red fox) runs", "Actor1 (a red fox) sleeps", "a snowy forest at dawn"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_pretrained(tmp_path_factory.mktemp("tiny"))


def _pipe(folder, scheduler: str = "ddim", policy: str = "v2") -> MultiScenePipeline:
    return MultiScenePipeline.from_pretrained(folder, scheduler=scheduler, policy=policy)


@pytest.fixture(scope="module")
def pipe(tiny_folder):
    return _pipe(tiny_folder)


def _seed(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _stock(folder, pipe: MultiScenePipeline, scheduler: str) -> CogVideoXPipeline:
    """Stock pipeline over a fresh stock transformer (stock attention processors) loaded
    from the same folder, and the same frozen VAE/T5/tokenizer objects."""
    return CogVideoXPipeline(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        transformer=CogVideoXTransformer3DModel.from_pretrained(folder / "transformer"),
        scheduler=build_scheduler(scheduler, pipe.scheduler.config),
    )


def _run_stock(stock: CogVideoXPipeline, params: SamplingParams, prompt: str, seed: int):
    """Stock frames ("np", float in [0, 1]) and its final latents (via the step callback)."""
    captured = {}

    def keep_latents(_pipe, _step, _t, kwargs):
        captured["latents"] = kwargs["latents"]
        return kwargs

    frames = stock(
        prompt=prompt,
        negative_prompt=params.negative_prompt,
        height=params.height,
        width=params.width,
        num_frames=params.num_frames,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        use_dynamic_cfg=params.use_dynamic_cfg,
        generator=_seed(seed),
        output_type="np",
        max_sequence_length=params.text_tokens,
        callback_on_step_end=keep_latents,
    ).frames
    return torch.from_numpy(frames[0]), captured["latents"]


# ---------------------------------------------------------------- stock reference (n = 1)


@pytest.mark.parametrize(
    ("scheduler", "policy", "dynamic_cfg"),
    [("ddim", "full", False), ("dpm", "full", False), ("ddim", "v2", True)],
)
def test_one_scene_reproduces_stock_cogvideox_pipeline(tiny_folder, scheduler, policy, dynamic_cfg):
    pipe = _pipe(tiny_folder, scheduler=scheduler, policy=policy)
    stock = _stock(tiny_folder, pipe, scheduler)
    params = _with(output="float", use_dynamic_cfg=dynamic_cfg)
    ours = pipe.generate(PROMPTS[:1], params, generator=_seed(7))
    stock_frames, stock_latents = _run_stock(stock, params, PROMPTS[0], seed=7)
    assert ours.latents.shape == stock_latents.shape == (1, 3, 4, 4, 6)
    torch.testing.assert_close(ours.latents, stock_latents, rtol=1e-5, atol=1e-5)
    assert ours.frames[0].shape == stock_frames.shape == (9, 32, 48, 3)
    torch.testing.assert_close(ours.frames[0], stock_frames, rtol=1e-5, atol=1e-5)
    # Guard against a vacuous match: another seed must move the stock output.
    _, other_latents = _run_stock(stock, params, PROMPTS[0], seed=8)
    assert not torch.allclose(other_latents, stock_latents, atol=1e-3)


def _with(**changes) -> SamplingParams:
    return SamplingParams(**{**PARAMS.to_dict(), **changes})


def test_uint8_frames_are_the_stock_float_frames_rounded(pipe):
    as_float = pipe.generate(PROMPTS[:1], _with(output="float"), generator=_seed(1))
    as_uint8 = pipe.generate(PROMPTS[:1], PARAMS, generator=_seed(1))
    assert as_uint8.frames[0].dtype == torch.uint8
    assert torch.equal(as_uint8.frames[0], (as_float.frames[0] * 255).round().to(torch.uint8))


# ---------------------------------------------------------------- fixed-count generation


class _ForwardSpy:
    """Records (batch size, timesteps) of every Mask2DiT call, then runs it."""

    def __init__(self, model, monkeypatch):
        self.calls = []
        forward = model.forward

        def spy(latents, text_embeds, timesteps, *args, **kwargs):
            self.calls.append((latents.shape[0], torch.as_tensor(timesteps).clone()))
            return forward(latents, text_embeds, timesteps, *args, **kwargs)

        monkeypatch.setattr(model, "forward", spy)


def test_scenes_of_different_lengths_decode_to_their_own_frame_counts(pipe):
    out = pipe.generate(PROMPTS, PARAMS, num_frames=[9, 17, 1], generator=_seed(0))
    assert out.scene_frames == [3, 5, 1]
    assert out.latents.shape == (1, 9, 4, 4, 6)
    assert [f.shape for f in out.frames] == [(9, 32, 48, 3), (17, 32, 48, 3), (1, 32, 48, 3)]
    assert all(f.dtype == torch.uint8 for f in out.frames)
    assert out.context_scenes == 0 and out.truncated == (False, False, False)


def test_each_scene_is_decoded_alone(pipe):
    out = pipe.generate(PROMPTS[:2], _with(output="float"), generator=_seed(0))
    for index, (start, stop) in enumerate([(0, 3), (3, 6)]):
        torch.testing.assert_close(out.frames[index], _decode(pipe, out.latents[:, start:stop]))
    # Why per scene: one VAE call over both scenes (6 latents) gives 24 frames, not 9 + 9.
    assert _decode(pipe, out.latents).shape[0] == 24


def test_same_seed_same_story_other_seed_other_story(pipe):
    first = pipe.generate(PROMPTS, PARAMS, generator=_seed(3))
    again = pipe.generate(PROMPTS, PARAMS, generator=_seed(3))
    other = pipe.generate(PROMPTS, PARAMS, generator=_seed(4))
    assert torch.equal(first.latents, again.latents)
    assert all(torch.equal(a, b) for a, b in zip(first.frames, again.frames, strict=True))
    assert not torch.allclose(first.latents, other.latents, atol=1e-3)


def test_guidance_scale_one_runs_without_the_unconditional_half(pipe, monkeypatch):
    spy = _ForwardSpy(pipe.transformer, monkeypatch)
    pipe.generate(PROMPTS, _with(guidance_scale=1.0), generator=_seed(0))
    assert [batch for batch, _ in spy.calls] == [1, 1, 1]
    spy.calls.clear()
    pipe.generate(PROMPTS, PARAMS, generator=_seed(0))
    assert [batch for batch, _ in spy.calls] == [2, 2, 2]


def test_guidance_with_the_prompt_as_negative_is_no_guidance(pipe):
    # uncond == cond makes uncond + s * (cond - uncond) the conditional prediction itself.
    same = ["a red fox"] * 3
    guided = pipe.generate(same, _with(negative_prompt="a red fox"), generator=_seed(5))
    plain = pipe.generate(same, _with(guidance_scale=1.0), generator=_seed(5))
    torch.testing.assert_close(guided.latents, plain.latents, rtol=1e-5, atol=1e-5)
    # ... and a real negative prompt changes the result (guidance is applied at all).
    negative = pipe.generate(same, PARAMS, generator=_seed(5))
    assert not torch.allclose(negative.latents, plain.latents, atol=1e-3)


def test_policy_reaches_the_model(pipe):
    v2 = pipe.generate(PROMPTS, PARAMS, generator=_seed(2))
    isolated = pipe.generate(PROMPTS, _with(policy="isolated"), generator=_seed(2))
    assert not torch.allclose(v2.latents, isolated.latents, atol=1e-4)


def test_long_prompts_are_truncated_and_reported(pipe):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("m2d.sampler")
    logger.addHandler(handler)
    try:
        out = pipe.generate(["x" * 100, "short"], PARAMS, generator=_seed(0))
    finally:
        logger.removeHandler(handler)
    assert out.truncated == (True, False)
    assert any("scene 0 prompt truncated" in r.getMessage() for r in records)


@pytest.mark.parametrize(
    ("changes", "frames", "message"),
    [
        ({}, 8, "8k \\+ 1"),
        # 5 frames -> 2 latents, which the VAE would decode to 8 frames.
        ({}, 5, "8k \\+ 1"),
        ({"height": 40}, 9, "multiples of 16"),
        ({}, [9, 9], "2 entries for 3 scenes"),
    ],
)
def test_bad_sizes_are_refused_before_sampling(pipe, changes, frames, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate(PROMPTS, _with(**changes), num_frames=frames, generator=_seed(0))


def test_vae_memory_switches_are_passed_to_the_vae(tiny_folder):
    pipe = MultiScenePipeline.from_pretrained(tiny_folder, vae_tiling=True, vae_slicing=True)
    assert pipe.vae.use_tiling and pipe.vae.use_slicing
    pipe = MultiScenePipeline.from_pretrained(tiny_folder)
    assert not pipe.vae.use_tiling and not pipe.vae.use_slicing


# ---------------------------------------------------------------- extension


def _decode(pipe, latents):
    """Independent decode: the VAE called directly, stock post-processing."""
    z = latents.permute(0, 2, 1, 3, 4) / pipe.vae.config.scaling_factor
    pixels = pipe.vae.decode(z).sample[0]
    return (pixels * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 3, 0)


def _encode_mode(pipe, frames_THWC):
    """Independent encode: the posterior mode of the VAE called directly."""
    pixels = frames_THWC.permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    z = pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist.mode()
    return z.permute(0, 2, 1, 3, 4) * pipe.vae.config.scaling_factor


def _context_video(seed: int, frames: int = 9) -> torch.Tensor:
    """A smooth moving gradient (what a VAE reconstructs sensibly), uint8 (T, H, W, 3)."""
    g = _seed(seed)
    base = torch.rand(3, 4, 6, generator=g)
    big = torch.nn.functional.interpolate(base[None], size=(32, 48), mode="bilinear")[0]
    video = torch.stack([big.roll(shifts=t, dims=2) for t in range(frames)])
    return (video.permute(0, 2, 3, 1) * 255).to(torch.uint8)


@torch.no_grad()
def test_extension_keeps_the_context_latents_exactly(pipe, monkeypatch):
    spy = _ForwardSpy(pipe.transformer, monkeypatch)
    params = _with(context_posterior="mode", output="float")
    context = [_context_video(0), _context_video(1, frames=17)]
    out = pipe.extend(PROMPTS, context, params, generator=_seed(0))
    clean = torch.cat([_encode_mode(pipe, video) for video in context], dim=1)
    assert out.scene_frames == [3, 5, 3] and out.context_scenes == 2
    assert [f.shape[0] for f in out.frames] == [9, 17, 9]
    assert torch.equal(out.latents[:, :8], clean)
    for index, (start, stop) in enumerate([(0, 3), (3, 8)]):
        torch.testing.assert_close(out.frames[index], _decode(pipe, clean[:, start:stop]))
    assert not torch.allclose(out.frames[2], out.frames[0], atol=1e-2)
    # Extension mode: (B, n) timesteps, context scenes at 0, the new scene at t > 0.
    for batch, timesteps in spy.calls:
        assert timesteps.shape == (batch, 3)
        assert (timesteps[:, :2] == 0).all() and (timesteps[:, 2] > 0).all()


@torch.no_grad()
def test_context_posterior_sample_is_drawn_from_the_generator_first(pipe):
    out = pipe.extend(PROMPTS[:2], [_context_video(0)], PARAMS, generator=_seed(9))
    pixels = _context_video(0).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    z = pipe.vae.encode(pixels).latent_dist.sample(_seed(9))
    expected = z.permute(0, 2, 1, 3, 4) * pipe.vae.config.scaling_factor
    assert torch.equal(out.latents[:, :3], expected)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_chained_extension_keeps_every_earlier_scene(tiny_folder, scheduler):
    pipe = _pipe(tiny_folder, scheduler=scheduler)
    params = _with(context_posterior="mode")
    context = [_context_video(0)]
    one = pipe.extend(PROMPTS[:2], context, params, generator=_seed(0))
    two = pipe.extend(PROMPTS, context, params, num_frames=[9, 1], generator=_seed(0))
    assert two.scene_frames == [3, 3, 1] and two.context_scenes == 1
    assert [f.shape[0] for f in two.frames] == [9, 9, 1]
    # Scene 2 is generated first with the same generator state, then kept as context.
    assert torch.equal(two.latents[:, :6], one.latents)
    assert torch.equal(two.frames[1], one.frames[1])
    assert not torch.allclose(two.latents[:, 6:], two.latents[:, 3:4], atol=1e-2)


def test_extend_latents_chains_from_a_generated_story(pipe):
    story = pipe.generate(PROMPTS[:2], PARAMS, generator=_seed(0))
    more = pipe.extend_latents(
        PROMPTS, story.latents, story.scene_frames, PARAMS, generator=_seed(1)
    )
    assert torch.equal(more.latents[:, :6], story.latents)
    assert all(torch.equal(a, b) for a, b in zip(more.frames[:2], story.frames, strict=True))


@pytest.mark.parametrize(
    ("prompts", "videos", "message"),
    [
        (PROMPTS[:1], [_context_video(0)], "at least one for a new scene"),
        (PROMPTS, [torch.zeros(9, 32, 32, 3, dtype=torch.uint8)], "sample and crop"),
        (PROMPTS, [torch.zeros(5, 32, 48, 3, dtype=torch.uint8)], "8k \\+ 1"),
        (PROMPTS, [torch.zeros(9, 32, 48, 3)], "uint8"),
        (PROMPTS, [], "at least one context video"),
    ],
)
def test_bad_context_is_refused(pipe, prompts, videos, message):
    with pytest.raises(ValueError, match=message):
        pipe.extend(prompts, videos, PARAMS, generator=_seed(0))


@torch.no_grad()
def test_bf16_pipeline_samples_and_keeps_context_exact(tiny_folder):
    # The GPU configuration (bf16 everywhere), run on the CPU.
    pipe = MultiScenePipeline.from_pretrained(tiny_folder, dtype=torch.bfloat16)
    assert pipe.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    context = _context_video(0)
    out = pipe.extend(PROMPTS[:2], [context], _with(context_posterior="mode"), generator=_seed(0))
    assert out.latents.dtype == torch.bfloat16
    assert torch.equal(out.latents[:, :3], _encode_mode(pipe, context))
    assert [f.dtype for f in out.frames] == [torch.uint8, torch.uint8]
    assert torch.isfinite(out.latents.float()).all()
