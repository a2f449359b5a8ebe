"""Tiny components: built from config, saved and loaded as a diffusers folder, encoders."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from infra.config import ModelConfig
from infra.errors import ConfigError
from trainer.components import load_training_parts, save_tiny_pretrained
from trainer.encode import encode_prompts, encode_videos


@pytest.fixture(scope="module")
def tiny():
    return load_training_parts(ModelConfig(source="tiny", text_tokens=8))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_pretrained(tmp_path_factory.mktemp("tiny") / "cogvideox")


def _videos(batch=2, frames=(9, 5, 9), size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (batch, f, 3, size, size), generator=g).to(torch.uint8)
        for f in frames
    ]


def test_tiny_components_fit_each_other(tiny):
    cfg = tiny.transformer.config
    assert tiny.vae.config.latent_channels == cfg.in_channels
    assert tiny.text_encoder.config.d_model == cfg.text_embed_dim
    assert tiny.scheduler.config.prediction_type == "v_prediction"
    assert not any(p.requires_grad for p in tiny.vae.parameters())
    assert not any(p.requires_grad for p in tiny.text_encoder.parameters())
    assert not tiny.vae.training and not tiny.text_encoder.training
    assert all(p.requires_grad for p in tiny.transformer.parameters())


def test_tiny_is_seeded():
    a = load_training_parts(ModelConfig(source="tiny"), seed=3)
    b = load_training_parts(ModelConfig(source="tiny"), seed=3)
    c = load_training_parts(ModelConfig(source="tiny"), seed=4)
    for x, y in zip(a.vae.parameters(), b.vae.parameters(), strict=True):
        assert torch.equal(x, y)
    ta, tc = a.transformer.state_dict(), c.transformer.state_dict()
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)


def test_saved_folder_round_trip(tiny, tiny_folder):
    loaded = load_training_parts(ModelConfig(source=str(tiny_folder), text_tokens=8))
    for name in ("transformer", "vae", "text_encoder"):
        ours, theirs = getattr(tiny, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    public = {k: v for k, v in tiny.scheduler.config.items() if not k.startswith("_")}
    assert {k: loaded.scheduler.config[k] for k in public} == public
    captions = [["a red square", "b"], ["c", "d" * 40]]
    assert torch.equal(
        encode_prompts(tiny.tokenizer, tiny.text_encoder, captions, 8),
        encode_prompts(loaded.tokenizer, loaded.text_encoder, captions, 8),
    )
    # The transformer subfolder is stock diffusers.
    stock = CogVideoXTransformer3DModel.from_pretrained(tiny_folder / "transformer")
    assert stock.state_dict().keys() == tiny.transformer.transformer.state_dict().keys()


def test_encode_videos_per_scene_shapes_and_scaling(tiny):
    videos = _videos()
    g = torch.Generator().manual_seed(0)
    latents, scene_frames = encode_videos(tiny.vae, videos, g)
    assert scene_frames == [3, 2, 3]  # 4k+1 frames -> k+1 latent frames, per scene
    assert latents.shape == (2, 8, 4, 4, 4)
    # Each scene is encoded alone: scene 1 equals encoding it by itself.
    alone, _ = encode_videos(tiny.vae, videos[1:2], sample=False)
    together, _ = encode_videos(tiny.vae, videos, sample=False)
    assert torch.allclose(together[:, 3:5], alone, atol=1e-6)
    # Scaled by the VAE's factor, from pixels mapped to [-1, 1].
    pixels = videos[0].float() / 127.5 - 1
    mode = tiny.vae.encode(pixels.permute(0, 2, 1, 3, 4)).latent_dist.mode()
    expected = mode.permute(0, 2, 1, 3, 4) * tiny.vae.config.scaling_factor
    assert torch.allclose(together[:, :3], expected, atol=1e-6)


def test_encode_videos_sampling_follows_the_generator(tiny):
    videos = _videos(batch=1)
    a, _ = encode_videos(tiny.vae, videos, torch.Generator().manual_seed(1))
    b, _ = encode_videos(tiny.vae, videos, torch.Generator().manual_seed(1))
    c, _ = encode_videos(tiny.vae, videos, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_encode_prompts_pads_and_truncates_each_scene(tiny):
    captions = [["short", "x" * 100, "mid caption"], ["a", "b", "c"]]
    embeds = encode_prompts(tiny.tokenizer, tiny.text_encoder, captions, 8)
    assert embeds.shape == (2, 24, 16)
    # A scene's block equals that caption encoded alone: scenes do not see each other.
    alone = encode_prompts(tiny.tokenizer, tiny.text_encoder, [["x" * 100]], 8)
    assert torch.allclose(embeds[0, 8:16], alone[0], atol=1e-6)
    with pytest.raises(ValueError, match="same number"):
        encode_prompts(tiny.tokenizer, tiny.text_encoder, [["a"], ["a", "b"]], 8)


def test_missing_folder_names_path_and_fix(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"nope: no such folder.*'tiny'"):
        load_training_parts(ModelConfig(source=str(missing)))


def test_missing_subfolder_is_named(tmp_path, tiny_folder):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ConfigError, match=r"missing subfolder\(s\) vae"):
        load_training_parts(ModelConfig(source=str(broken)))


def test_loaded_weights_sit_in_torch_memory(tiny, tiny_folder):
    """Loaded from safetensors, every weight is 64-byte aligned like torch's own tensors
    (diffusers hands over the file's memory map at 8-byte offsets, and CPU kernels round
    by alignment), with the saved values."""
    loaded = load_training_parts(ModelConfig(source=str(tiny_folder), text_tokens=8))
    stock = CogVideoXTransformer3DModel.from_pretrained(tiny_folder / "transformer")
    assert any(p.data_ptr() % 64 for p in stock.parameters())  # what is fixed here
    for name in ("transformer", "vae", "text_encoder"):
        ours, theirs = getattr(tiny, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(t.data_ptr() % 64 == 0 for t in theirs.values()), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
