"""`m2d eval` as a user runs it: a tiny CLIP (random weights, byte tokenizer) saved with
save_pretrained, a sample-batch output layout, a real `mlflow server`.

The layout is written the way the sampler writes it (``meta.json`` last, its fields as
``sampler.batch`` records them); its videos are built so the answer is known: a story
whose three scenes are copies of one video (visual consistency 100%) and a story of
three unrelated videos (lower).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from m2d_cli import local_env
from sample_items import item_meta, write_meta
from tiny_models import tiny_clip, tiny_videomae

from infra.video import write_video

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
M2D = [sys.executable, "-c", "from orchestrator.cli import main; main()"]
LABEL = "pre-step7"
FRAMES = 9


def _video(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (1, 32, 32, 3), generator=generator, dtype=torch.uint8)
    return base.repeat(FRAMES, 1, 1, 1)


def write_item(out: Path, story: str, videos: list[torch.Tensor], training_run: str) -> Path:
    folder = out / LABEL / story / "0"
    for index, frames in enumerate(videos):
        write_video(str(folder / f"scene_{index:02d}.mp4"), frames, fps=8)
    prompts = [f"Actor1 (a red fox) in scene {i}" for i in range(len(videos))]
    meta = item_meta(story, prompts, [FRAMES] * len(videos), LABEL, 7, training_run)
    write_meta(folder, meta)
    return folder


@pytest.fixture
def layout(tmp_path, mlflow_server):
    from infra.config import TrackingConfig
    from infra.tracking import Tracker

    tracking = TrackingConfig(uri=mlflow_server, experiment=f"eval-{tmp_path.name}")
    training = Tracker.start(tracking, "pre", tags={"stage": "pretrain"})
    out = tmp_path / "samples"
    sample_run = Tracker.start(tracking, "sample", tags={"stage": "sample", "m2d.out": str(out)})
    write_item(out, "copies", [_video(1)] * 3, training.run_id)
    write_item(out, "apart", [_video(2), _video(3), _video(4)], training.run_id)
    return {
        "out": out,
        "clip": tiny_clip(tmp_path / "clip"),
        "tracking": tracking,
        "training": training,
        "sample_run": sample_run,
    }


def m2d_eval(
    layout, *args: str, samples: Path | None = None, encoder: str = "clip", tracking: bool = True
) -> subprocess.CompletedProcess:
    env = local_env()
    command = [*M2D, "eval", "--cluster", "local", "--samples", str(samples or layout["out"])]
    command += ["--encoder", encoder, "--encoder-path", str(layout["clip"])]
    if tracking:
        command += ["--set", f"tracking.uri={layout['tracking'].uri}"]
        command += ["--set", f"tracking.experiment={layout['tracking'].experiment}"]
    return subprocess.run(
        [*command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_eval_scores_stories_writes_results_and_logs_them_at_the_checkpoint_step(layout):
    done = m2d_eval(layout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 item(s) to score, 0 already scored" in done.stdout
    folder = layout["out"] / LABEL
    rows = {row["story"]: row for row in csv.DictReader((folder / "stories.csv").open())}
    assert float(rows["copies"]["visual"]) == pytest.approx(100.0, abs=1e-3)
    assert float(rows["apart"]["visual"]) < 99.0
    # Every prompt names Actor1: every pair shares a character, none is unshared.
    assert rows["copies"]["visual_shared_character"] == rows["copies"]["visual"]
    assert rows["copies"]["visual_no_shared_character"] == ""
    for row in rows.values():
        semantic, visual = float(row["semantic"]), float(row["visual"])
        assert -100 <= semantic <= 100
        assert float(row["sequence"]) == pytest.approx((visual + semantic) / 2)

    metrics = json.loads((folder / "metrics.json").read_text())
    visual = metrics["metrics"]["visual"]
    mean = (float(rows["copies"]["visual"]) + float(rows["apart"]["visual"])) / 2
    assert visual["n"] == 2 and visual["mean"] == pytest.approx(mean)
    assert visual["low"] <= visual["mean"] <= visual["high"]
    assert metrics["checkpoint"]["step"] == 7 and metrics["items"] == 2
    assert json.loads((layout["out"] / "metrics.json").read_text())[LABEL] == metrics

    client = layout["training"].client
    history = client.get_metric_history(layout["training"].run_id, "eval/visual")
    assert [(m.step, m.value) for m in history] == [(7, pytest.approx(visual["mean"]))]
    assert client.get_metric_history(layout["training"].run_id, "eval/semantic_low")
    sampled = client.get_metric_history(layout["sample_run"].run_id, f"eval/{LABEL}/visual")
    assert [m.step for m in sampled] == [7]

    scores = folder / "copies" / "0" / "scores.json"
    before = scores.stat().st_mtime_ns
    again = m2d_eval(layout, "--no-tracking")
    assert again.returncode == 0, again.stderr
    assert "0 item(s) to score, 2 already scored" in again.stdout
    assert scores.stat().st_mtime_ns == before


def test_bad_samples_are_one_line_or_a_counted_skip(layout, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = m2d_eval(layout, "--no-tracking", samples=empty)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no finished sample-batch item" in done.stderr.strip().splitlines()[-1]

    wrong = m2d_eval(layout, "--no-tracking", encoder="xclip")
    assert wrong.returncode == 2
    assert "config.json is not an X-CLIP model (model_type 'clip')" in wrong.stderr

    broken = layout["out"] / LABEL / "apart" / "0" / "scene_01.mp4"
    broken.write_bytes(broken.read_bytes()[:40])  # cut: no index, undecodable
    done = m2d_eval(layout, "--no-tracking")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((layout["out"] / LABEL / "metrics.json").read_text())
    assert metrics["items"] == 1 and metrics["skipped"] == {"undecodable": 1}
    assert metrics["metrics"]["visual"]["mean"] == pytest.approx(100.0, abs=1e-3)

    meta_file = layout["out"] / LABEL / "copies" / "0" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["inputs"]["params"] = {"steps": 50}  # the other item: no params recorded
    meta_file.write_text(json.dumps(meta))
    mixed = m2d_eval(layout, "--no-tracking")
    assert mixed.returncode == 2 and "Traceback" not in mixed.stderr, mixed.stderr
    assert "sampled with different settings" in mixed.stderr.strip().splitlines()[-1]


def _reference_fvd(features_a, features_b) -> float:
    """The textbook Fréchet distance, with scipy's sqrtm: an independent computation."""
    import numpy as np
    import scipy.linalg

    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * covmean))


def test_fvd_is_zero_against_itself_and_matches_an_independent_computation(tmp_path):
    """Real clips from `m2d data synth` as the reference; as samples, once those very clips
    (FVD 0) and once noise videos (the FVD scipy computes from the same features)."""
    import shutil

    from evaluation.encoders import load_encoder
    from infra.job_specs import EvalSpec
    from sampler.eval_job import clip_features

    reference = tmp_path / "ref"
    synth = [*M2D, "data", "synth", "--out", str(reference), "--stories", "3", "--frames", "9"]
    subprocess.run(synth, cwd=ROOT, check=True, capture_output=True)
    manifest = reference / "pretrain.jsonl"
    clips = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(clips) == 12  # more than the features' 8 dimensions
    layout = {"clip": tiny_clip(tmp_path / "clip"), "tracking": None}
    videomae = tiny_videomae(tmp_path / "videomae")

    same, noise = tmp_path / "same", tmp_path / "noise"
    stories: dict[str, list[str]] = {}
    for clip in clips:
        stories.setdefault(clip["path"].split("/")[1], []).append(clip["path"])
    for number, (story, paths) in enumerate(stories.items()):
        folder = write_item(same, story, [_video(0)] * len(paths), "")
        for index, path in enumerate(paths):  # the reference clip itself as the scene
            shutil.copyfile(reference / path, folder / f"scene_{index:02d}.mp4")
        write_item(noise, story, [_noise(10 * number + i) for i in range(len(paths))], "")

    fvd = ["--reference", str(manifest), "--fvd-path", str(videomae), "--no-tracking"]
    fvd += ["--set", f"storage.root={tmp_path / 'runs'}"]  # where the statistics are cached
    values = {}
    for samples in (same, noise):
        done = m2d_eval(layout, *fvd, samples=samples, tracking=False)
        assert done.returncode == 0, done.stdout + done.stderr
        values[samples.name] = json.loads((samples / LABEL / "metrics.json").read_text())["fvd"]
        cached = "reference statistics from" if samples is noise else "cached in"
        assert cached in done.stdout, done.stdout
    assert values["same"]["generated"] == values["same"]["reference"] == 12
    assert abs(values["same"]["value"]) < 1e-6

    spec = EvalSpec(samples=str(noise), encoder_path=str(layout["clip"]))
    encoder = load_encoder("videomae", str(videomae))
    real = [clip_features(encoder, str(reference / c["path"]), 9, spec) for c in clips]
    fake = [
        clip_features(encoder, str(scene), 9, spec) for scene in sorted(noise.rglob("scene_*.mp4"))
    ]
    assert values["noise"]["value"] == pytest.approx(_reference_fvd(fake, real), rel=1e-6)
    assert values["noise"]["value"] > 1e-3

    again = m2d_eval(layout, *fvd, samples=noise, tracking=False)
    assert again.returncode == 0 and "reference statistics from" in again.stdout, again.stdout


def _noise(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (FRAMES, 32, 32, 3), generator=generator, dtype=torch.uint8)
