"""The toy model: an exact pixel VAE, a word-level T5, saved and loaded like CogVideoX,
run by Mask2DiT, the sampler and the planner."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from diffusers import CogVideoXPipeline
from transformers import AutoTokenizer

from datajobs.shard_encoder import posterior
from evaluation.toy_world import VOCABULARY, render_scene, split_stories
from infra.config import ClusterProfile, ModelConfig, StageRecipe, StorageConfig, resolve_run
from infra.errors import ConfigError
from infra.job_specs import CheckpointSpec, SampleJobSpec
from mask2dit.components import load_parts, save_parts, toy_parts
from mask2dit.encoding import encode_prompt_batch, encode_video
from mask2dit.model import Mask2DiT
from mask2dit.sampling.encode import decode_scene
from mask2dit.sampling.params import SamplingParams
from mask2dit.sampling.pipeline import MultiScenePipeline
from mask2dit.tiny import TOY_VAE, TOY_VAE_CLASS, toy_configs
from mask2dit.toy import SPECIAL_TOKENS, ToyVAE, word_tokenizer
from orchestrator.plan.estimate import plan_run
from orchestrator.plan.shapes import numel, t5_encoder_shapes, transformer_shapes, vae_shapes
from orchestrator.plan.sources import read_model_configs
from sampler.batch import sampling_params
from sampler.checkpoint_info import CheckpointInfo
from trainer.components import load_training_parts
from trainer.data.latents import sample_latents

ROOT = Path(__file__).resolve().parents[2]
FRAMES, SIZE, TEXT_TOKENS = 5, 16, 8  # a toy scene; 5 words + eos fit 8 tokens


@pytest.fixture(scope="module")
def toy():
    return toy_parts(VOCABULARY, seed=0)


@pytest.fixture(scope="module")
def toy_folder(toy, tmp_path_factory):
    return save_parts(toy, tmp_path_factory.mktemp("toy") / "model")


@pytest.fixture(scope="module")
def story():
    """Three rendered scenes (uint8 (T, H, W, 3) each) and their prompts."""
    (drawn,), _ = split_stories(seed=0, train=1, held_out=0, num_scenes=3)
    rng = random.Random(0)
    scenes = [render_scene(drawn, k, FRAMES, SIZE, SIZE, rng) for k in range(3)]
    return scenes, drawn.prompts()


def _pixels(seed: int = 0) -> torch.Tensor:
    """Floats in [-1, 1], (B, 3, T, H, W), no two alike."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, FRAMES, SIZE, SIZE, generator=g) * 2 - 1


# ---------------------------------------------------------------- the pixel VAE


def test_toy_vae_latents_are_the_pixels_rearranged():
    vae = ToyVAE(**TOY_VAE)
    x = _pixels()
    z = vae.encode(x).latent_dist.mode()
    r = TOY_VAE["spatial_compression_ratio"]
    assert z.shape == (2, 3 * r * r, FRAMES, SIZE // r, SIZE // r)
    # Independent of pixel_unshuffle: channel c r² + i r + j at (y, x) is pixel (y r + i, x r + j).
    for c, i, j in [(0, 0, 0), (1, 0, 1), (2, 1, 0), (2, 1, 1)]:
        assert torch.equal(z[:, c * r * r + i * r + j], x[:, c, :, i::r, j::r])


def test_toy_vae_decodes_exactly_what_it_encoded():
    vae = ToyVAE(**TOY_VAE)
    x = _pixels(1)
    posterior_ = vae.encode(x).latent_dist
    assert torch.equal(vae.decode(posterior_.mode()).sample, x)
    # Through the project's own encode and decode, with the scaling factor (a power of 2):
    # the uint8 frames come back bit for bit.
    frames = torch.randint(0, 256, (FRAMES, 3, SIZE, SIZE), dtype=torch.uint8)
    latents = encode_video(vae, frames.transpose(0, 1)[None], torch.Generator().manual_seed(0))
    assert latents.shape == (1, FRAMES, vae.latent_channels, SIZE // 2, SIZE // 2)
    decoded = decode_scene(vae, latents)[0].transpose(0, 1)
    assert torch.equal(((decoded + 1) * 127.5).round().to(torch.uint8), frames)


def test_toy_vae_posterior_is_a_point_mass_that_still_draws_its_noise():
    vae = ToyVAE(**TOY_VAE)
    x = _pixels(2)
    dist = vae.encode(x).latent_dist
    mean, logvar = dist.parameters.chunk(2, dim=1)
    assert torch.isneginf(logvar).all() and torch.equal(dist.mode(), mean)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(dist.sample(g), mean)
    drawn = torch.Generator().manual_seed(5)
    torch.randn(mean.shape, generator=drawn)  # a generator advances as with the real VAE
    assert torch.equal(g.get_state(), drawn.get_state())
    # Precomputed latents (the stored mean and logvar) sample the same exact mean.
    stored_mean, stored_logvar = posterior(vae, x)
    latents = sample_latents(vae, stored_mean, stored_logvar, torch.Generator().manual_seed(5))
    assert torch.equal(latents, encode_video(vae, x, torch.Generator().manual_seed(5)))


def test_toy_vae_has_no_parameters_and_moves_with_to():
    vae = ToyVAE(**TOY_VAE)
    assert list(vae.parameters()) == [] and vae_shapes(toy_configs()["vae"]) == {}
    vae.to(torch.bfloat16)
    assert vae.dtype == torch.bfloat16
    assert encode_video(vae, _pixels(), sample=False).dtype == torch.bfloat16
    for call in (vae.enable_tiling, vae.disable_tiling, vae.enable_slicing, vae.disable_slicing):
        call()  # the sampler's memory switches are accepted


def test_toy_vae_refuses_what_it_cannot_invert():
    with pytest.raises(ValueError, match="temporal_compression_ratio"):
        ToyVAE(temporal_compression_ratio=4)
    with pytest.raises(ValueError, match="divisible by 2"):
        ToyVAE(**TOY_VAE).encode(torch.zeros(1, 3, 1, 15, 16))


# ---------------------------------------------------------------- the text side


def test_each_word_is_one_distinct_token(toy):
    tokenizer = toy.tokenizer
    ids = tokenizer(list(VOCABULARY), add_special_tokens=False).input_ids
    assert all(len(row) == 1 for row in ids)
    assert len({row[0] for row in ids}) == len(VOCABULARY)
    row = tokenizer(
        ["A red square moves left"], padding="max_length", max_length=TEXT_TOKENS
    ).input_ids[0]
    pad, eos, unk = (tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS)
    assert (pad, eos, unk) == (0, 1, 2)  # T5's pad and eos ids
    assert row[5:] == [eos, pad, pad] and unk not in row  # lower-cased, eos, then padding
    assert tokenizer("a purple square").input_ids[1] == unk
    with pytest.raises(ValueError, match="distinct words"):
        word_tokenizer(["red", "Red"])


def test_distinct_words_have_distinct_embeddings(toy):
    table = toy.text_encoder.shared.weight.detach()
    d_model = toy.text_encoder.config.d_model
    gram = table @ table.T
    assert torch.allclose(gram, d_model * torch.eye(len(table)), atol=1e-4)  # orthogonal rows
    # Encoded in a prompt, one changed word changes its own position's embedding.
    prompts = [f"a {color} square moves left" for color in ("red", "yellow", "white", "cyan")]
    embeds, _ = encode_prompt_batch(toy.tokenizer, toy.text_encoder, prompts, TEXT_TOKENS)
    colors = embeds[:, 1]
    distances = torch.cdist(colors, colors) + torch.eye(len(prompts)) * 1e9
    assert distances.min() > 0.1 * colors.norm(dim=-1).mean()


def test_the_vocabulary_must_fit_the_t5():
    with pytest.raises(ValueError, match="do not fit"):
        toy_parts([f"w{i}" for i in range(40)])


# ---------------------------------------------------------------- saved and loaded


def test_saved_toy_folder_loads_back_identical(toy, toy_folder, story):
    loaded = load_parts(toy_folder)
    assert isinstance(loaded.vae, ToyVAE)
    assert {k: loaded.vae.config[k] for k in TOY_VAE} == TOY_VAE
    assert (toy_folder / "vae" / "config.json").read_text().count(f'"{TOY_VAE_CLASS}"') == 1
    scenes, prompts = story
    assert AutoTokenizer.from_pretrained(toy_folder / "tokenizer")(prompts).input_ids == (
        toy.tokenizer(prompts).input_ids
    )
    texts = [
        encode_prompt_batch(p.tokenizer, p.text_encoder, prompts, TEXT_TOKENS)[0]
        for p in (toy, loaded)
    ]
    assert torch.equal(*texts)
    videos = [scene.permute(3, 0, 1, 2)[None] for scene in scenes]
    latents = [
        torch.cat([encode_video(p.vae, v, sample=False) for v in videos], 1) for p in (toy, loaded)
    ]
    assert torch.equal(*latents)
    text = texts[0].reshape(1, -1, texts[0].shape[-1])
    outputs = [
        Mask2DiT(copy.deepcopy(p.transformer)).eval()(latents[0], text, 500, [FRAMES] * 3)
        for p in (toy, loaded)
    ]
    assert torch.equal(*outputs)


def test_load_components_builds_the_toy_seeded_and_frozen(toy_folder):
    built = load_training_parts(ModelConfig(source="toy", text_tokens=TEXT_TOKENS), seed=0)
    again = load_training_parts(ModelConfig(source=str(toy_folder), text_tokens=TEXT_TOKENS))
    other = load_training_parts(ModelConfig(source="toy"), seed=1)
    cfg = built.transformer.config
    assert built.vae.latent_channels == cfg.in_channels
    assert built.text_encoder.config.d_model == cfg.text_embed_dim
    assert not built.text_encoder.training and not built.vae.training
    for name in ("transformer", "text_encoder"):
        ours, theirs = getattr(built, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    ours, theirs = built.transformer.state_dict(), other.transformer.state_dict()
    assert any(not torch.equal(ours[k], theirs[k]) for k in ours)


# ---------------------------------------------------------------- the model and sampler


def test_mask2dit_at_one_scene_is_the_stock_transformer(toy, story):
    """RoPE with frames passed through (temporal ratio 1) and an 8x8 latent grid: as the
    diffusers pipeline builds it for 16x16 pixels and a VAE factor of 2."""
    stock = copy.deepcopy(toy.transformer).eval()
    scenes, prompts = story
    latents = encode_video(toy.vae, scenes[0].permute(3, 0, 1, 2)[None], sample=False)
    text, _ = encode_prompt_batch(toy.tokenizer, toy.text_encoder, prompts[:1], TEXT_TOKENS)
    fake_pipe = SimpleNamespace(vae_scale_factor_spatial=2, transformer=stock)
    rope = CogVideoXPipeline._prepare_rotary_positional_embeddings(
        fake_pipe, SIZE, SIZE, FRAMES, torch.device("cpu")
    )
    timestep = torch.tensor([700])
    with torch.no_grad():
        expected = stock(
            hidden_states=latents,
            encoder_hidden_states=text,
            timestep=timestep,
            image_rotary_emb=rope,
        ).sample
        ours = Mask2DiT(copy.deepcopy(stock)).eval()(latents, text, timestep, [FRAMES])
    assert torch.allclose(ours, expected, atol=1e-5)


def test_mask2dit_runs_three_toy_scenes_forward_and_backward(toy, story):
    scenes, prompts = story
    latents = torch.cat(
        [encode_video(toy.vae, scene.permute(3, 0, 1, 2)[None]) for scene in scenes], 1
    )
    text, _ = encode_prompt_batch(toy.tokenizer, toy.text_encoder, prompts, TEXT_TOKENS)
    model = Mask2DiT(copy.deepcopy(toy.transformer))
    v = model(latents, text.reshape(1, -1, text.shape[-1]), 300, [FRAMES] * 3)
    assert v.shape == latents.shape == (1, 3 * FRAMES, 12, SIZE // 2, SIZE // 2)
    v.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_extension_gives_back_its_context_scenes_pixel_for_pixel(toy, story):
    """Context latents stay clean and the VAE is exact, so the sampled story's context
    scenes are the given frames, and the new scene has the toy world's shape."""
    pipeline = MultiScenePipeline.from_parts(copy.deepcopy(toy)).to("cpu")
    scenes, prompts = story
    params = SamplingParams(
        num_inference_steps=2, text_tokens=TEXT_TOKENS, num_frames=FRAMES, height=SIZE, width=SIZE
    )
    out = pipeline.extend(prompts, scenes[:2], params, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.frames[0], scenes[0]) and torch.equal(out.frames[1], scenes[1])
    assert out.frames[2].shape == (FRAMES, SIZE, SIZE, 3) and out.frames[2].dtype == torch.uint8


def test_the_sample_job_takes_toy_scenes_of_2k_plus_1_frames(tmp_path):
    spec = SampleJobSpec(
        cluster="local",
        checkpoints=[CheckpointSpec(uri="/ckpt", label="c")],
        out=str(tmp_path / "out"),
        prompts="p.jsonl",
        model=ModelConfig(source="toy", text_tokens=TEXT_TOKENS),
        recipe=StageRecipe(frames=FRAMES, height=SIZE, width=SIZE),
        storage=StorageConfig(root=str(tmp_path)),
    )
    info = CheckpointInfo("training", 0, None, spec.recipe, spec.model, spec.storage)
    assert sampling_params(spec, info).num_frames == FRAMES  # CogVideoX would need 8k + 1
    with pytest.raises(ConfigError, match="2k\\+1 frames"):
        sampling_params(spec.model_copy(update={"frames": 4}), info)


# ---------------------------------------------------------------- the planner


def test_the_planner_reads_the_toy_model_m2d_builds(toy):
    configs = read_model_configs(ModelConfig(source="toy"), None)
    planned = {
        "transformer": transformer_shapes(configs.transformer),
        "vae": vae_shapes(configs.vae),
        "text_encoder": t5_encoder_shapes(configs.text_encoder),
    }
    built = {
        part: {name: tuple(p.shape) for name, p in getattr(toy, part).named_parameters()}
        for part in planned
    }
    assert planned == built


def test_the_planner_plans_a_toy_run():
    profile = yaml.safe_load((ROOT / "clusters" / "local.yaml").read_text())
    profile["model"] = {"source": "toy", "text_tokens": TEXT_TOKENS}
    shape = {"frames": FRAMES, "height": SIZE, "width": SIZE}
    for stage in profile["stages"].values():
        stage.update(shape)
    run = resolve_run(ClusterProfile.model_validate(profile), "local", "pretrain")
    plan = plan_run(run, read_model_configs(run.model, run.storage))
    # 3 scenes x (8 text + 5 frames x 4 x 4 patches).
    assert plan.sequence.tokens == 3 * (TEXT_TOKENS + FRAMES * 4 * 4)
    assert plan.parameters["vae"] == 0
    assert plan.parameters["transformer"] == numel(transformer_shapes(toy_configs()["transformer"]))
