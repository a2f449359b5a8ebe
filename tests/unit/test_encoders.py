"""The evaluation encoders on tiny random models saved with save_pretrained: what each
embeds, and how it reads its folder."""

from __future__ import annotations

import json

import pytest
import torch

from evaluation.encoders import check_encoder, load_encoder, text_encoder_of
from infra.errors import ConfigError, DataError

TOWER = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}


def _frames(seed: int, count: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, 40, 48), generator=generator, dtype=torch.uint8)


def test_dinov2_averages_unit_frame_features_and_embeds_no_text(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(image_size=32, patch_size=8, intermediate_size=16, **TOWER))
    model.save_pretrained(tmp_path)
    check_encoder("dinov2", str(tmp_path))
    encoder = load_encoder("dinov2", str(tmp_path))
    assert text_encoder_of(encoder) is None  # no semantic consistency from it
    still = _frames(1, 1).repeat(8, 1, 1, 1)
    embedding = encoder.embed(still)
    assert embedding.shape == (8,) and embedding.norm() == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(embedding, encoder.embed(_frames(2)))


def test_videomae_reads_its_folders_normalisation(tmp_path):
    from transformers import VideoMAEConfig, VideoMAEModel

    config = VideoMAEConfig(
        image_size=32, patch_size=8, num_frames=4, tubelet_size=2, intermediate_size=16, **TOWER
    )
    torch.manual_seed(0)
    VideoMAEModel(config).save_pretrained(tmp_path)
    encoder = load_encoder("videomae", str(tmp_path))
    assert encoder.num_frames == 4
    default = encoder.embed(_frames(3, 4))
    assert default.shape == (8,) and default.dtype == torch.float32
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    )
    assert not torch.allclose(load_encoder("videomae", str(tmp_path)).embed(_frames(3, 4)), default)
    with pytest.raises(ValueError, match="VideoMAE takes 4 frames, got 8"):
        encoder.embed(_frames(3))
    with pytest.raises(DataError, match="is not a DINOv2 model"):
        check_encoder("dinov2", str(tmp_path))


def test_a_users_own_encoder_plugs_in_by_module_and_function(tmp_path, monkeypatch):
    (tmp_path / "my_viclip.py").write_text(
        "import torch\n"
        "class Encoder:\n"
        "    name = 'viclip'\n"
        "    num_frames = 2\n"
        "    def __init__(self, uri): self.uri = uri\n"
        "    def embed(self, frames): return frames.float().mean(dim=(0, 2, 3))\n"
        "    def embed_texts(self, prompts): return torch.ones(len(prompts), 3)\n"
        "def load(uri, storage):\n"
        "    return Encoder(uri)\n"
        "def broken(uri, storage):\n"
        "    return 'not an encoder'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    check_encoder("my_viclip:load", "/models/viclip")
    encoder = load_encoder("my_viclip:load", "/models/viclip")
    assert encoder.uri == "/models/viclip" and text_encoder_of(encoder) is encoder
    assert encoder.embed(_frames(1, 2)).shape == (3,)
    with pytest.raises(ConfigError, match=r"my_viclip:nothing: cannot import it .*PYTHONPATH"):
        check_encoder("my_viclip:nothing", "x")
    with pytest.raises(ConfigError, match="no_such_module:load: cannot import it"):
        load_encoder("no_such_module:load", "x")
    with pytest.raises(ConfigError, match="returned str, which lacks num_frames or embed"):
        load_encoder("my_viclip:broken", "x")


def test_the_tiny_encoders_load_through_the_real_code_and_others_are_refused(tmp_path, monkeypatch):
    """`--encoder-path tiny`: a seeded tiny CLIP (video and text) and VideoMAE, built once
    into the temporary folder; the same weights as the tests' own tiny CLIP."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    clip = load_encoder("clip", "tiny")
    assert text_encoder_of(clip) is not None
    check_encoder("videomae", "tiny")
    frames = torch.randint(0, 256, (clip.num_frames, 3, 32, 32), dtype=torch.uint8)
    again = load_encoder("clip", str(tmp_path / "m2d-tiny-clip"))  # built once, kept
    assert torch.equal(clip.embed(frames), again.embed(frames))
    from tiny_models import tiny_clip

    own = load_encoder("clip", str(tiny_clip(tmp_path / "own")))
    assert torch.equal(own.embed(frames), clip.embed(frames))
    with pytest.raises(ConfigError, match=r"no tiny xclip encoder \(tiny ones: clip, videomae"):
        load_encoder("xclip", "tiny")
