"""``m2d data shots`` for real: a Ray Data actor pool over a folder of long videos with
known cuts (``datajobs.cut_synth``), a video that is not one, a part left by an earlier
run that was killed; then the same on a real S3 server (moto)."""

from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path

import pytest
from m2d_cli import local_env, run_m2d

from datajobs.cut_synth import cut_video
from datajobs.shots import part_uri
from infra.config import StorageConfig
from infra.storage import filesystem

pytestmark = pytest.mark.integration

FPS = 24.0


def _spans(rows: list[dict], video: str) -> list[tuple[int, int]]:
    """(first frame, frame count) of each shot of ``video``."""
    return [
        (round(float(r["start"]) * FPS), int(r["num_frames"])) for r in rows if r["path"] == video
    ]


def _close(spans: list[tuple[int, int]], cuts: list[int], frames: int) -> bool:
    """Whether the shots are bounded by the real cuts, within a frame each."""
    bounds = [0, *cuts, frames]
    truth = [(a, b - a) for a, b in itertools.pairwise(bounds)]
    return len(spans) == len(truth) and all(
        abs(a - b) <= 1 and abs((a + n) - (b + m)) <= 1
        for (a, n), (b, m) in zip(spans, truth, strict=True)
    )


def test_shots_of_a_folder_resume_a_killed_run_and_count_a_bad_video(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    seeds = {"one.mp4": 2, "two.mp4": 3}  # seeds whose cuts are found exactly (unit tier)
    truth = {name: cut_video(str(raw / name), seed) for name, seed in seeds.items()}
    (raw / "bad.mp4").write_text("<html>403 Forbidden</html>")
    out = tmp_path / "shots.csv"
    # The earlier run finished "two.mp4" before it was killed: its part says 2 shots.
    earlier = {"video": str(raw / "two.mp4"), "fps": FPS, "width": 96, "height": 64}
    earlier.update(frames=96, cuts=[48])
    part = Path(part_uri(str(out), str(raw / "two.mp4")))
    part.parent.mkdir()
    part.write_text(json.dumps(earlier))
    env = local_env(M2D_HOME=str(tmp_path / "home"))
    done = run_m2d(env, "data", "shots", str(raw), "--out", str(out), "--min-shot", "0.5")
    assert done.returncode == 0, done.stderr
    assert (
        "shots from 2 videos (1 detected now, 1 by an earlier run, 1 unreadable); "
        "skipped: video_undecodable=1" in done.stdout
    ), done.stdout
    rows = list(csv.DictReader(out.open()))
    assert _spans(rows, "raw/two.mp4") == [(0, 48), (48, 48)]  # the part, not re-detected
    frames = sum(n for _, n in _spans(rows, "raw/one.mp4"))
    assert _close(_spans(rows, "raw/one.mp4"), truth["one.mp4"], frames), (rows, truth)
    assert not part.parent.exists()  # the parts go once the manifest is written
    again = run_m2d(env, "data", "shots", str(raw), "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_shots_of_videos_on_s3(s3_endpoint, s3_bucket, tmp_path):
    root = f"s3://{s3_bucket}"
    storage = StorageConfig(root=root, endpoint_url=s3_endpoint)
    local = tmp_path / "one.mp4"
    cuts = cut_video(str(local), 2)
    fs, _ = filesystem(root, storage)
    fs.put(str(local), f"{s3_bucket}/footage/one.mp4")
    out = f"{root}/manifests/shots.jsonl"
    env = local_env(M2D_HOME=str(tmp_path / "home"))
    done = run_m2d(
        env,
        "data",
        "shots",
        f"{root}/footage",
        "--out",
        out,
        "--min-shot",
        "0.5",
        "--endpoint-url",
        s3_endpoint,
    )
    assert done.returncode == 0, done.stderr
    rows = [
        json.loads(line) for line in io.StringIO(fs.cat_file(out.removeprefix("s3://")).decode())
    ]
    spans = _spans(rows, f"{root}/footage/one.mp4")  # not under the manifest's folder: whole
    assert _close(spans, cuts, sum(n for _, n in spans)), (rows, cuts)
