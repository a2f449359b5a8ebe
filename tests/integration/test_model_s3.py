"""Model sources on S3 (a real moto_server through s3fs): the diffusers folder a user
uploads loads exactly like the local folder, jobs that need only the encoders copy only
their subfolders, the local copy is reused until the upload changes, and a folder
without a part is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from infra.config import ModelConfig, StorageConfig
from infra.errors import ConfigError
from trainer.components import load_training_parts, save_tiny_pretrained

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save_tiny_pretrained(tmp_path_factory.mktemp("tiny") / "cogvideox", seed=5)


@pytest.fixture
def uploaded(tiny_folder, s3_endpoint, s3_bucket, tmp_path, monkeypatch):
    """(s3fs filesystem, source URI, storage) of the tiny folder uploaded, cache in tmp."""
    import s3fs

    monkeypatch.setenv("M2D_MODEL_CACHE", str(tmp_path / "cache"))
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.put(str(tiny_folder), f"{s3_bucket}/models/tiny", recursive=True)
    storage = StorageConfig(root=f"s3://{s3_bucket}/runs", endpoint_url=s3_endpoint)
    return fs, f"s3://{s3_bucket}/models/tiny", storage


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    ours, theirs = a.state_dict(), b.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def cached_parts(cache: Path) -> dict[str, set[str]]:
    """The cached copies: folder name -> subfolders it holds."""
    return {
        copy.name: {p.name for p in copy.iterdir() if p.is_dir()}
        for copy in cache.iterdir()
        if not copy.name.startswith(".")
    }


def test_s3_source_loads_like_the_local_folder(uploaded, tiny_folder, tmp_path):
    fs, source, storage = uploaded
    local = load_training_parts(ModelConfig(source=str(tiny_folder)))
    remote = load_training_parts(ModelConfig(source=source), storage)
    for name in ("vae", "text_encoder"):
        assert same_weights(getattr(local, name), getattr(remote, name)), name
    assert same_weights(local.transformer, remote.transformer)

    encoders = load_training_parts(ModelConfig(source=source), storage, encoders_only=True)
    assert encoders.transformer is None
    assert same_weights(local.vae, encoders.vae)
    every = {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"}
    copies = cached_parts(tmp_path / "cache")
    assert sorted(copies.values(), key=len) == [every - {"transformer"}, every]

    # Unchanged upload: no new copy. Changed upload: a new one, with the new weights.
    load_training_parts(ModelConfig(source=source), storage, encoders_only=True)
    assert cached_parts(tmp_path / "cache") == copies
    config = json.loads(fs.cat_file(f"{source}/scheduler/scheduler_config.json"))
    config["num_train_timesteps"] = 500
    fs.pipe_file(f"{source}/scheduler/scheduler_config.json", json.dumps(config).encode())
    changed = load_training_parts(ModelConfig(source=source), storage, encoders_only=True)
    assert changed.scheduler.config.num_train_timesteps == 500
    assert len(cached_parts(tmp_path / "cache")) == 3


def test_s3_source_without_a_part_is_refused_by_name(uploaded):
    fs, source, storage = uploaded
    fs.rm(f"{source}/text_encoder", recursive=True)
    with pytest.raises(ConfigError, match=r"missing subfolder\(s\) text_encoder"):
        load_training_parts(ModelConfig(source=source), storage, encoders_only=True)
    fs.rm(f"{source}/transformer", recursive=True)
    with pytest.raises(ConfigError, match=r"missing subfolder\(s\) transformer, text_encoder"):
        load_training_parts(ModelConfig(source=source), storage)
