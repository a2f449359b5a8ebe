"""The data path against a real S3 API server (moto_server) through s3fs."""

from __future__ import annotations

import pytest
import torch

from datajobs.synth import synthesize
from infra.config import StorageConfig
from infra.storage import filesystem
from infra.video import read_frames, write_video
from trainer.data.loader import StoryLoader
from trainer.data.manifest import Clip, read_clips, read_shot_groups
from trainer.data.order import PretrainOrder, SFTOrder

pytestmark = pytest.mark.integration


@pytest.fixture
def dataset(s3_endpoint, s3_bucket):
    """A synthetic dataset written straight to the bucket; returns (root URI, storage)."""
    root = f"s3://{s3_bucket}/datasets/toy"
    storage = StorageConfig(root=root, endpoint_url=s3_endpoint)
    synthesize(root, stories=3, scenes=3, frames=17, height=32, width=48, seed=0, storage=storage)
    return root, storage


def test_manifests_on_s3_resolve_paths_into_the_bucket(dataset):
    root, storage = dataset
    clips, skips = read_clips(f"{root}/pretrain.jsonl", storage)
    groups, group_skips = read_shot_groups(f"{root}/sft.jsonl", 3, storage)
    assert len(clips) == 12 and len(groups) == 3 and skips.total == group_skips.total == 0
    assert clips[0].path == f"{root}/videos/story000/shot0.mp4"
    assert [shot for group in groups for shot in group.shots] == clips


def test_both_stages_decode_stories_through_s3fs(dataset):
    root, storage = dataset
    clips, _ = read_clips(f"{root}/pretrain.jsonl", storage)
    groups, _ = read_shot_groups(f"{root}/sft.jsonl", 3, storage)
    pretrain = StoryLoader(PretrainOrder(clips, 3, seed=0), 9, 16, 16, "pretrain", storage)
    sft = StoryLoader(SFTOrder(groups, 3, seed=0), 9, 16, 16, "sft", storage)
    for loader in (pretrain, sft):
        decoded = next(loader)
        assert len(decoded.videos) == 3 and loader.skips.total == 0
        assert all(v.shape == (9, 3, 16, 16) and v.dtype == torch.uint8 for v in decoded.videos)
        # Real pictures came back: a background plus at least one colored actor.
        assert all(len(torch.unique(v[0].flatten(1), dim=1).T) >= 2 for v in decoded.videos)


def test_bad_objects_in_the_bucket_are_counted(dataset):
    root, storage = dataset
    fs, path = filesystem(f"{root}/bad/zero.mp4", storage)
    fs.pipe(path, b"")
    fs.pipe(path.replace("zero", "junk"), b"\x00garbage" * 200)
    good, _ = read_clips(f"{root}/pretrain.jsonl", storage)
    bad = [Clip(f"{root}/bad/{name}.mp4", name, 17, 8.0, 48, 32) for name in ("zero", "junk")]
    bad.append(Clip(f"{root}/bad/absent.mp4", "absent", 17, 8.0, 48, 32))
    loader = StoryLoader(PretrainOrder(good[:2] + bad, 1, seed=0), 9, 32, 48, "pretrain", storage)
    for _ in range(3):  # 2 good per epoch: the third story finishes epoch 0
        assert next(loader).story.clips[0] in good
    assert set(loader.skips.as_dict()) == {"zero_byte", "undecodable", "missing"}


def test_read_frames_seeks_inside_an_s3_object(s3_endpoint, s3_bucket):
    storage = StorageConfig(root=f"s3://{s3_bucket}", endpoint_url=s3_endpoint)
    uri = f"s3://{s3_bucket}/long.mp4"
    # Frame k is flat gray k (flat frames survive compression within a level or two).
    frames = torch.stack([torch.full((16, 16, 3), k, dtype=torch.uint8) for k in range(200)])
    write_video(uri, frames, fps=25, storage=storage)
    got = read_frames(uri, [100, 3], storage, start=1.0)  # file frames 125 and 28
    means = [float(frame.float().mean()) for frame in got]
    assert abs(means[0] - 125) <= 3 and abs(means[1] - 28) <= 3, means


def test_m2d_data_inspect_reads_an_s3_manifest(dataset, s3_endpoint):
    from click.testing import CliRunner

    from orchestrator.cli import cli

    root, _ = dataset
    args = ["data", "inspect", f"{root}/sft.jsonl", "--scenes", "3", "--endpoint-url", s3_endpoint]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "3 groups, 12 shots; skipped: none" in result.output
