"""benchmarks/gpu_check.py --dry-run: the prepared GPU check runs end to end on CPU at
small shapes, so the script is known to work before a GPU is ever lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_writes_a_complete_report(tmp_path):
    report_path = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(report_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["dry_run"] is True and report["device"] == "cpu"
    for section in ("gpu_tests", "attention", "training", "sample"):
        assert "error" not in report[section], report[section].get("trace")
    assert report["gpu_tests"]["exit_code"] == 0
    assert report["attention"]["ok"] and report["attention"]["seq_len"] == 3 * (8 + 2 * 16)
    training = report["training"]
    assert training["ok"] and len(training["losses"]) == 5
    assert training["losses"][-1] < training["losses"][0]  # the same batch five times
    assert report["sample"] == {**report["sample"], "scenes": 2, "ok": True}
