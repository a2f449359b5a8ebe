"""``m2d data import`` for real: a Panda-70M-style clip list over long mp4 files, the
headers read by Ray tasks, the manifest read back by the trainer's reader, locally and
with the list, the videos and the manifest on a real S3 server (moto).

The expected clips come from the list and from how the test wrote each video (frame
count, rate, size), not from the job's own probing: the clip's frame count is its
length times the rate it was written at.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from m2d_cli import local_env, run_m2d

from infra.config import StorageConfig
from infra.storage import filesystem
from infra.video import read_frames, write_video
from trainer.data.manifest import read_clips

pytestmark = pytest.mark.integration

FPS, HEIGHT, WIDTH = 8, 32, 48
LENGTHS = {"long": 80, "short": 40}  # frames written: 10 s and 5 s
ROWS = [  # videoID, [start, end] pairs, captions
    (
        "long",
        [("0:00:00.000", "0:00:02.500"), ("0:00:02.500", "0:00:09.000")],
        ["a red ball", "a cube"],
    ),
    ("short", [("0:00:01.000", "0:00:04.000"), ("0:00:04.000", "0:00:07.000")], ["a cone", "late"]),
    ("gone", [("0:00:01.000", "0:00:02.000")], ["never downloaded"]),
    ("broken", [("0:00:01.000", "0:00:02.000")], ["not a video"]),
    ("long", [("0:00:01.000", "0:00:02.000")], ["one", "two"]),
]
EXPECTED = [  # (video, caption, frames, start, end): what a correct import makes
    ("long", "a red ball", 20, 0.0, 2.5),
    ("long", "a cube", 52, 2.5, 9.0),
    ("short", "a cone", 24, 1.0, 4.0),
]
SUMMARY = (
    "imported 3 of 6 listed clips from 4 videos; skipped: clip_past_video_end=1, "
    "row_caption_count=1, video_missing=1, video_undecodable=1"
)


@pytest.fixture(scope="module")
def footage(tmp_path_factory) -> Path:
    """``raw/`` with the videos (one is not a video, one is absent) and ``clips.csv``."""
    folder = tmp_path_factory.mktemp("footage")
    (folder / "raw").mkdir()
    for name, frames in LENGTHS.items():
        pixels = torch.randint(0, 255, (frames, HEIGHT, WIDTH, 3), dtype=torch.uint8)
        write_video(str(folder / "raw" / f"{name}.mp4"), pixels, FPS)
    (folder / "raw" / "broken.mp4").write_text("an HTML error page, saved as mp4")
    with (folder / "clips.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["videoID", "url", "timestamp", "caption"])
        for video, pairs, captions in ROWS:
            writer.writerow(
                [
                    video,
                    f"https://example.com/{video}",
                    str([list(p) for p in pairs]),
                    str(captions),
                ]
            )
    return folder


def _check(manifest: str, videos: str, storage: StorageConfig | None) -> None:
    clips, skips = read_clips(manifest, storage)
    assert skips.total == 0
    got = [(c.path, c.caption, c.num_frames, c.start, c.end) for c in clips]
    assert got == [(f"{videos}/{v}.mp4", cap, n, s, e) for v, cap, n, s, e in EXPECTED]
    assert {(c.fps, c.width, c.height) for c in clips} == {(FPS, WIDTH, HEIGHT)}
    last = clips[1]  # its last frame is 9 s into a 10 s video
    frames = read_frames(last.path, [last.num_frames - 1], storage, last.start, last.end)
    assert frames.shape == (1, HEIGHT, WIDTH, 3)


def test_a_local_clip_list_becomes_a_manifest_the_trainer_reads(footage, tmp_path):
    out = tmp_path / "data" / "pretrain.csv"
    env = local_env(M2D_HOME=str(tmp_path / "home"))
    done = run_m2d(
        env, "data", "import", str(footage / "clips.csv"), "--videos", "raw", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert SUMMARY in done.stdout, done.stdout
    _check(str(out), str(footage / "raw"), None)
    again = run_m2d(
        env, "data", "import", str(footage / "clips.csv"), "--videos", "raw", "--out", str(out)
    )
    assert again.returncode == 2 and "already exists" in again.stderr  # nothing overwritten
    assert read_clips(str(out))[0]


def test_a_clip_list_and_videos_on_s3(footage, s3_endpoint, s3_bucket, tmp_path):
    root = f"s3://{s3_bucket}"
    storage = StorageConfig(root=root, endpoint_url=s3_endpoint)
    fs, _ = filesystem(root, storage)
    fs.put(f"{footage}/", f"{s3_bucket}/footage/", recursive=True)
    out = f"{root}/manifests/pretrain.jsonl"
    env = local_env(M2D_HOME=str(tmp_path / "home"))
    done = run_m2d(
        env,
        "data",
        "import",
        f"{root}/footage/clips.csv",
        "--videos",
        f"{root}/footage/raw",
        "--out",
        out,
        "--endpoint-url",
        s3_endpoint,
    )
    assert done.returncode == 0, done.stderr
    assert SUMMARY in done.stdout, done.stdout
    _check(out, f"{root}/footage/raw", storage)
