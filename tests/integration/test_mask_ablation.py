"""The mask ablation's miniature (issue 28 point 8): `benchmarks/mask_ablation.py --quick`
end to end - toy stories, every mask policy pre-trained then fine-tuned, the training
settings ablation (pre-training only, SFT only), both sampling modes, the oracle, the
table, MLflow - at a few steps per stage. It asserts the pipeline and the oracle, not the
targets: four training steps teach nothing.

The oracle's numbers in the table are checked against the oracle run here on the mp4s the
sampler wrote; a rerun of the finished experiment trains, renders and logs nothing new.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
from m2d_cli import local_env
from mlflow.tracking import MlflowClient

from evaluation.toy_oracle import score_story
from infra.run_folder import ItemMeta
from infra.video import read_frames

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "mask_ablation.py"
POLICIES = ["isolated", "v2", "v2+text-sees-all-video", "v2+video-sees-all-text", "full"]
ROWS = [*POLICIES, "v2, pre-training only", "v2, SFT only"]
CELL = re.compile(r"^(\d\.\d\d) \[(\d\.\d\d), (\d\.\d\d)\]$")


def _run(out: Path, doc: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--doc", str(doc)]
    return subprocess.run(
        argv, cwd=ROOT, env=local_env(), capture_output=True, text=True, timeout=1500
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    out, doc = root / "experiment", root / "docs" / "ablation.md"
    done = _run(out, doc)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, doc, done.stdout


def _table(doc: Path) -> dict[str, list[str]]:
    """The report's table: row name -> its cells."""
    rows = {}
    for line in doc.read_text().splitlines():
        if line.startswith("| ") and not line.startswith("| policy"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_every_row_is_trained_sampled_scored_and_reported(finished):
    _, doc, stdout = finished
    launches = re.findall(r"^\$ m2d launch .*--stage (\w+) --name (\S+)(.*)$", stdout, re.M)
    # One pre-training per policy, one SFT from it each, plus v2's SFT from the base model.
    assert sorted(stage for stage, _, _ in launches) == ["pretrain"] * 5 + ["sft"] * 6
    from_base = [name for _, name, rest in launches if "--from-base" in rest]
    assert from_base == ["abl-v2-s0-base-sft4"]
    # Both modes of every run rendered in one sample-batch job each.
    assert stdout.count("$ m2d sample-batch") == 2

    table = _table(doc)
    assert list(table) == [*ROWS, "chance"]
    for name in ROWS:
        stories, *cells = table[name]
        assert stories == "3"  # the miniature's held-out stories
        intervals = [CELL.match(cell) for cell in cells if " [" in cell]
        assert len(intervals) == 8 and all(intervals), (name, cells)  # fixed 6, extend 2
        for found in intervals:
            mean, low, high = map(float, found.groups())
            assert 0 <= low <= mean <= high <= 1
    text = doc.read_text()
    assert "## Targets (issue 28)" in text and "v2 cross-scene agreement >= 0.95" in text
    figures = doc.parent / "ablation"
    assert (figures / "plot.png").stat().st_size > 0
    assert {p.name for p in figures.glob("contact_*.png")} == {
        "contact_isolated.png",
        "contact_v2.png",
        "contact_v2-text-sees-all-video.png",
        "contact_v2-video-sees-all-text.png",
        "contact_full.png",
        "contact_v2-pre-training-only.png",
        "contact_v2-SFT-only.png",
    }


def test_the_table_holds_what_the_oracle_reads_from_the_rendered_videos(finished):
    out, doc, _ = finished
    samples = sorted((out / "samples" / "fixed").glob("abl-full-s0-sft4-step*"))
    assert len(samples) == 1
    with (samples[0] / "stories.csv").open() as handle:
        rows = {row["story"]: row for row in csv.DictReader(handle)}
    assert len(rows) == 3
    agreements = []
    for story, row in rows.items():
        item = samples[0] / story / "0"
        meta = ItemMeta.model_validate_json((item / "meta.json").read_text())
        scenes = [
            read_frames(str(item / f"scene_{i:02d}.mp4"), list(range(count)))
            for i, count in enumerate(meta.scene_frames)
        ]
        scores = score_story(scenes, meta.inputs.prompts)
        for name in ("agreement", "color", "shape", "motion", "alignment", "leakage"):
            recorded = None if row[name] == "" else float(row[name])
            assert recorded == scores[name], (story, name)
        agreements.append(scores["agreement"])
    # ... and the table's cell is their mean over the stories.
    cell = _table(doc)["full"][1]
    assert cell.startswith(f"{sum(agreements) / len(agreements):.2f} [")


def test_the_experiment_is_logged_once_a_child_per_row(finished):
    out, _, _ = finished
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("m2d-mask-ablation")
    found = client.search_runs([experiment.experiment_id], "tags.`m2d.ablation` != ''")
    assert len(found) == 1
    parent = found[0]
    assert parent.data.metrics["v2/agreement"] >= 0
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    stages = {run.info.run_name: run.data.tags["m2d.stages"] for run in children}
    assert stages == {
        "isolated-s0": "pretrain+sft",
        "v2-s0": "pretrain+sft",
        "v2-text-sees-all-video-s0": "pretrain+sft",
        "v2-video-sees-all-text-s0": "pretrain+sft",
        "full-s0": "pretrain+sft",
        "v2-pre-training-only-s0": "pretrain",
        "v2-SFT-only-s0": "sft",
    }
    assert all("fixed/agreement" in run.data.metrics for run in children)


def test_a_rerun_of_the_finished_experiment_redoes_nothing(finished):
    out, doc, _ = finished
    metas = {p: p.stat().st_mtime_ns for p in (out / "samples").glob("*/*/*/*/meta.json")}
    assert len(metas) == 2 * 7 * 3  # modes x checkpoints x held-out stories
    table = _table(doc)
    again = _run(out, doc)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "$ m2d" not in again.stdout  # nothing trained or rendered
    assert {p: p.stat().st_mtime_ns for p in metas} == metas
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("m2d-mask-ablation")
    assert len(client.search_runs([experiment.experiment_id], "tags.`m2d.ablation` != ''")) == 1
    assert _table(doc) == table  # the same report, written again
