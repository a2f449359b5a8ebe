"""Normal / extension task preparation, loss masking and the task mix."""

from __future__ import annotations

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

from mask2dit.tasks import TaskMix, prepare_training_batch, task_loss

SCENE_FRAMES = [2, 3, 2]  # context = first 5 frames, target = last 2


def scheduler(kind: str = "ddim"):
    # The CogVideoX-5B scheduler settings (zero-SNR, v-prediction).
    cls = CogVideoXDDIMScheduler if kind == "ddim" else CogVideoXDPMScheduler
    return cls(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        snr_shift_scale=1.0,
        timestep_spacing="trailing",
    )


def latents(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(
        batch, sum(SCENE_FRAMES), 3, 4, 4, generator=torch.Generator().manual_seed(seed)
    )


def prepare(x, extension, kind="ddim", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return prepare_training_batch(x, SCENE_FRAMES, extension, scheduler(kind), gen)


# ---------------------------------------------------------------- batch preparation


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_noise_and_velocity_follow_the_schedule(kind):
    x = latents()
    batch = prepare(x, torch.zeros(4, dtype=torch.bool), kind)
    t = batch.timesteps[:, 0]
    assert batch.timesteps.dtype == torch.long
    assert torch.equal(batch.timesteps, t[:, None].repeat(1, 3))
    assert ((t >= 0) & (t < 1000)).all()
    alpha_bar = scheduler(kind).alphas_cumprod.float()[t].view(-1, 1, 1, 1, 1)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    assert torch.allclose(batch.noisy_latents, a * x + s * batch.noise, atol=1e-6)
    assert torch.allclose(batch.target, a * batch.noise - s * x, atol=1e-6)
    assert batch.loss_mask.all()


def test_extension_context_is_put_back_exactly_clean():
    x = latents()
    extension = torch.tensor([True, False, True, False])
    batch = prepare(x, extension)
    noised = prepare(x, torch.zeros(4, dtype=torch.bool))  # same seed: same t and noise
    assert torch.equal(batch.noisy_latents[extension, :5], x[extension, :5])
    assert torch.equal(batch.noisy_latents[extension, 5:], noised.noisy_latents[extension, 5:])
    assert torch.equal(batch.noisy_latents[~extension], noised.noisy_latents[~extension])
    assert not torch.equal(batch.noisy_latents[~extension, :5], x[~extension, :5])
    t = noised.timesteps[:, 0]
    assert torch.equal(batch.timesteps[extension], torch.stack([0 * t, 0 * t, t], 1)[extension])
    assert torch.equal(batch.timesteps[~extension], noised.timesteps[~extension])
    expected_mask = torch.ones(4, 7, dtype=torch.bool)
    expected_mask[extension, :5] = False
    assert torch.equal(batch.loss_mask, expected_mask)


def test_batch_is_reproducible_from_generator_seed():
    x, ext = latents(), torch.tensor([True, False, False, True])
    a, b, c = prepare(x, ext, seed=3), prepare(x, ext, seed=3), prepare(x, ext, seed=4)
    assert torch.equal(a.noisy_latents, b.noisy_latents) and torch.equal(a.timesteps, b.timesteps)
    assert not torch.equal(a.noise, c.noise)


def test_extension_needs_two_scenes_and_frames_must_add_up():
    x = latents()
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=">= 2 scenes"):
        prepare_training_batch(x, [7], torch.ones(4, dtype=torch.bool), scheduler(), gen)
    single = prepare_training_batch(x, [7], torch.zeros(4, dtype=torch.bool), scheduler(), gen)
    assert single.timesteps.shape == (4, 1)
    with pytest.raises(ValueError, match="sum to"):
        prepare_training_batch(x, [2, 2], torch.zeros(4, dtype=torch.bool), scheduler(), gen)


# ---------------------------------------------------------------- loss


def test_extension_loss_ignores_context_predictions():
    x = latents(batch=2)
    extension = torch.tensor([True, True])
    batch = prepare(x, extension)
    pred = torch.randn_like(batch.target, requires_grad=True)
    out = task_loss(pred, batch.target, batch.loss_mask, extension)
    out.loss.backward()
    assert torch.equal(pred.grad[:, :5], torch.zeros_like(pred.grad[:, :5]))
    assert (pred.grad[:, 5:] != 0).all()
    expected = (pred[:, 5:] - batch.target[:, 5:]).square().mean()
    assert torch.allclose(out.loss, expected)
    assert out.normal is None and torch.allclose(out.extension, expected)


def test_normal_loss_uses_all_scenes_and_components_split_by_task():
    x = latents()
    extension = torch.tensor([False, True, False, True])
    batch = prepare(x, extension)
    pred = torch.randn_like(batch.target, requires_grad=True)
    out = task_loss(pred, batch.target, batch.loss_mask, extension)
    out.loss.backward()
    assert (pred.grad[~extension] != 0).all()
    err = (pred - batch.target).square()
    normal = err[~extension].mean()
    ext = err[extension, 5:].mean()
    assert torch.allclose(out.normal, normal) and torch.allclose(out.extension, ext)
    # Per-sample means, then the batch mean: each task holds half of the samples here.
    assert torch.allclose(out.loss, (normal + ext) / 2)
    assert not out.normal.requires_grad


# ---------------------------------------------------------------- task mix


def test_task_mix_reproducible_and_frequency_near_p():
    a, b = TaskMix(0.3, seed=7), TaskMix(0.3, seed=7)
    draws = torch.stack([a.draw(step, 2) for step in range(4000)])
    again = torch.stack([b.draw(step, 2) for step in range(4000)])
    assert torch.equal(draws, again)
    assert (draws[:, 0] == draws[:, 1]).all()  # per step: the whole batch shares the task
    assert abs(draws[:, 0].float().mean().item() - 0.3) < 0.03
    # A "resumed" mix drawing from step 2000 on repeats the same sequence.
    resumed = torch.stack([TaskMix(0.3, seed=7).draw(s, 2) for s in range(2000, 4000)])
    assert torch.equal(resumed, draws[2000:])
    other_seed = torch.stack([TaskMix(0.3, seed=8).draw(s, 2) for s in range(4000)])
    assert not torch.equal(other_seed, draws)


def test_task_mix_per_step_identical_across_ranks():
    mix = TaskMix(0.5, seed=1)
    for step in range(50):
        assert all(torch.equal(mix.draw(step, 3, rank=r), mix.draw(step, 3)) for r in (1, 5))
    assert len({bool(mix.draw(s, 1)[0]) for s in range(50)}) == 2


def test_task_mix_per_sample_varies_by_rank_and_sample():
    mix = TaskMix(0.5, seed=1, per_sample=True)
    draws = {r: torch.stack([mix.draw(s, 4, rank=r) for s in range(200)]) for r in (0, 1)}
    assert torch.equal(draws[0], torch.stack([mix.draw(s, 4, rank=0) for s in range(200)]))
    assert not torch.equal(draws[0], draws[1])
    assert (draws[0].any(dim=1) & ~draws[0].all(dim=1)).any()  # mixed batches occur
    assert abs(draws[0].float().mean().item() - 0.5) < 0.06


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_task_mix_extremes(p):
    mix = TaskMix(p, seed=0, per_sample=True)
    assert all(bool((mix.draw(s, 8) == bool(p)).all()) for s in range(100))


def test_task_mix_rejects_bad_probability():
    with pytest.raises(ValueError, match="p_extension"):
        TaskMix(1.5, seed=0)
