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
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infra.video import write_video

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
M2D = [sys.executable, "-c", "from orchestrator.cli import main; main()"]
LABEL = "pre-step7"
FRAMES = 9


def tiny_clip(folder: Path) -> Path:
    from transformers import ByT5Tokenizer, CLIPConfig, CLIPModel

    tokenizer = ByT5Tokenizer()
    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    tower["num_attention_heads"] = 2
    text = {**tower, "vocab_size": len(tokenizer), "max_position_embeddings": 32}
    text.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=text,
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _video(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (1, 32, 32, 3), generator=generator, dtype=torch.uint8)
    return base.repeat(FRAMES, 1, 1, 1)


def write_item(out: Path, story: str, videos: list[torch.Tensor], training_run: str) -> Path:
    folder = out / LABEL / story / "0"
    for index, frames in enumerate(videos):
        write_video(str(folder / f"scene_{index:02d}.mp4"), frames, fps=8)
    prompts = [f"Actor1 (a red fox) in scene {i}" for i in range(len(videos))]
    meta = {
        "inputs": {"story": story, "seed": 0, "mode": "fixed", "prompts": prompts},
        "checkpoint": {
            "label": LABEL,
            "uri": "/runs/pre/checkpoint_00000007",
            "run": "pre",
            "kind": "training",
            "step": 7,
            "mlflow_run_id": training_run,
        },
        "scene_frames": [FRAMES] * len(videos),
        "context_scenes": 0,
    }
    (folder / "meta.json").write_text(json.dumps(meta))
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
    layout, *args: str, samples: Path | None = None, encoder: str = "clip"
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    tracking = layout["tracking"]
    command = [*M2D, "eval", "--cluster", "local", "--samples", str(samples or layout["out"])]
    command += ["--encoder", encoder, "--encoder-path", str(layout["clip"])]
    command += ["--set", f"tracking.uri={tracking.uri}"]
    command += ["--set", f"tracking.experiment={tracking.experiment}"]
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
