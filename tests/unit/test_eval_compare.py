"""`m2d eval --compare`: the paper's table from the metrics.json files `m2d eval` wrote."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
M2D = [sys.executable, "-c", "from orchestrator.cli import main; main()"]


def _metrics(mean: float) -> dict:
    def value(m):
        return {"mean": m, "low": m - 1, "high": m + 1, "n": 50}

    return {
        "checkpoint": {"step": 5000},
        "items": 50,
        "metrics": {
            "visual": value(mean),
            "semantic": value(20.0),
            "sequence": value(round(mean / 2, 2)),
        },
    }


def _scored(root: Path, labels: dict[str, float]) -> Path:
    summaries = {label: _metrics(mean) for label, mean in labels.items()}
    for label, summary in summaries.items():
        (root / label).mkdir(parents=True)
        (root / label / "metrics.json").write_text(json.dumps(summary))
    (root / "metrics.json").write_text(json.dumps(summaries))
    return root


def _m2d(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "M2D_HOME": str(cwd / "home")}
    return subprocess.run(
        [*M2D, "eval", "--cluster", "local", *args], cwd=cwd, env=env, capture_output=True,
        text=True,
    )  # fmt: skip


def test_compare_prints_one_row_per_checkpoint_with_intervals(tmp_path):
    a = _scored(tmp_path / "base", {"cogvideox-step0": 55.01})
    b = _scored(tmp_path / "ours", {"sft-step5000": 70.95, "sft-step10000": 73.5})
    done = _m2d("--compare", str(a), "--compare", str(b / "sft-step5000"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:5] == ["checkpoint", "step", "items", "visual", "semantic"]
    assert lines[1].split()[:3] == ["base/cogvideox-step0", "5000", "50"]
    assert "55.01 [54.01, 56.01]" in lines[1] and "27.50 [26.50, 28.50]" in lines[1]
    assert lines[2].split()[0] == "sft-step5000/sft-step5000" and "70.95 [69.95, 71.95]" in lines[2]
    assert lines[1].rstrip().endswith("-")  # no character split in these
    assert len(lines) == 3

    table = tmp_path / "table.csv"
    done = _m2d("--compare", str(b), "--table-out", str(table), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(table.open()))
    assert [r["checkpoint"] for r in rows] == ["sft-step5000", "sft-step10000"]
    assert float(rows[1]["visual"]) == 73.5 and float(rows[1]["visual_low"]) == 72.5
    markdown = tmp_path / "table.md"
    assert _m2d("--compare", str(b), "--table-out", str(markdown), cwd=tmp_path).returncode == 0
    assert markdown.read_text().splitlines()[2].startswith("| sft-step5000 | 5000 | 50 | 70.95")


def test_compare_refuses_what_it_cannot_read_or_would_overwrite(tmp_path):
    (tmp_path / "kept.md").write_text("a user's notes")
    scored = _scored(tmp_path / "s", {"x": 1.0})
    for args, message in [
        (["--compare", str(tmp_path / "nothing")], "no metrics.json; run `m2d eval` on it first"),
        (["--compare", str(scored), "--table-out", str(tmp_path / "kept.md")], "exists"),
        (["--compare", str(scored), "--table-out", str(tmp_path / "t.txt")], ".csv or .md"),
        ([], "--samples: give the --out folder"),
    ]:
        done = _m2d(*args, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
    assert (tmp_path / "kept.md").read_text() == "a user's notes"


def test_compare_json_holds_the_tables_numbers(tmp_path):
    b = _scored(tmp_path / "ours", {"sft-step5000": 70.95, "sft-step10000": 73.5})
    done = _m2d("--compare", str(b), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert done.stdout.endswith("\n") and done.stdout.count("\n") == 1
    assert [(r["checkpoint"], r["step"], r["items"]) for r in rows] == [
        ("sft-step5000", 5000, 50),
        ("sft-step10000", 5000, 50),
    ]
    assert rows[1]["metrics"]["visual"] == {"mean": 73.5, "low": 72.5, "high": 74.5, "n": 50}
    assert rows[0]["fvd"] is None
    alone = _m2d("--samples", str(b), "--json", cwd=tmp_path)
    assert alone.returncode == 2 and "--json applies to --compare only" in alone.stderr
