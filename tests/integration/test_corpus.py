"""Every malformed input of `tests/corpus/cli.yaml` through the real `m2d`: one line and
the right exit status, no traceback, nothing a user made changed, no partial output.

Each case runs in a workspace of its own (a copy of one template: profiles good and
broken, a finished run's record, a dataset, samples), two at a time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from m2d_cli import M2D, ROOT
from tcp_proxy import SwitchProxy

from orchestrator.runs import resolve_run

pytestmark = pytest.mark.integration

CASES = yaml.safe_load((ROOT / "tests" / "corpus" / "cli.yaml").read_text())
# click's usage lines and the console's log header may precede the one line of the error.
_FRAME = ("Usage: ", "Try '", "log: ")


def _template(root: Path) -> Path:
    ws = root / "template"
    clusters = ws / "clusters"
    clusters.mkdir(parents=True)
    local = (ROOT / "clusters" / "local.yaml").read_text()
    (clusters / "good.yaml").write_text(
        local.replace("data/synth/", f"{ws}/dataset/").replace("./runs", f"{ws}/runs")
    )
    (clusters / "typo.yaml").write_text(
        local.replace("  num_workers: 2\n", "  num_workers: 2\n  gpus_per_wroker: 0\n")
    )
    (clusters / "binary.yaml").write_bytes(b"description: x\xff\xfe\n")
    (clusters / "syntax.yaml").write_text("ray:\n  address: [local\n")
    (clusters / "alist.yaml").write_text("- ray\n- workers\n")
    (clusters / "orphan.yaml").write_text("extends: missing.yaml\n")
    (ws / "dataset").mkdir()
    for name in ("pretrain.jsonl", "sft.jsonl", "my-notes.txt"):
        (ws / "dataset" / name).write_text(f"a user's {name}\n")
    (ws / "loop").symlink_to(ws / "loop")  # a symlink loop, where a folder would go
    (ws / "samples" / "ckpt").mkdir(parents=True)
    (ws / "samples" / "ckpt" / "meta.json").write_text("{}")
    (ws / "home" / "runs").mkdir(parents=True)
    (ws / "home" / "runs" / "done-run.json").write_text(
        '{"name": "done-run", "cluster": "good", "stage": "pretrain", "kind": "local", '
        f'"run_dir": "{ws}/runs/done-run", "config_uri": "{ws}/runs/done-run/run_config.json", '
        '"exit_code": 0}'
    )
    (ws / "runs" / "done-run").mkdir(parents=True)
    (ws / "runs" / "done-run" / "run_config.json").write_text(
        resolve_run(str(clusters), "good", "pretrain").model_dump_json(indent=2)
    )
    return ws


def _state(ws: Path) -> dict[str, tuple[int, int]]:
    """Every file of the workspace but m2d's own logs: (size, mtime)."""
    return {
        str(p.relative_to(ws)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in ws.rglob("*")
        if p.is_file() and p.relative_to(ws).parts[:2] != ("home", "logs")
    }


def _run_case(case: dict, template: Path, root: Path, index: int, silent: str) -> str | None:
    """What is wrong with m2d's answer to ``case`` (None: nothing). ``{ws}`` in its args
    and files is its workspace, ``{silent}`` the URL of a server that accepts connections
    and never answers."""
    ws = root / f"case{index:03d}"
    shutil.copytree(template, ws, symlinks=True)

    def placed(text: str) -> str:
        return text.replace("{ws}", str(ws)).replace("{silent}", silent)

    for name, text in (case.get("files") or {}).items():
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / name).write_text(placed(text))
    before = _state(ws)
    drop = ("RAY_", "AWS_", "MLFLOW_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(M2D_HOME=str(ws / "home"), M2D_CLUSTERS_DIR=str(ws / "clusters"))
    env.update(case.get("env") or {})
    args = [placed(str(arg)) for arg in case["args"]]
    done = subprocess.run(
        [*M2D, *args], cwd=ws, env=env, capture_output=True, text=True, timeout=180
    )
    said = f"exit {done.returncode}, stdout {done.stdout[-500:]!r}, stderr {done.stderr[-1500:]!r}"
    if "Traceback" in done.stderr + done.stdout:
        return f"a traceback: {said}"
    if done.returncode != case["exit"]:
        return f"exit {done.returncode}, not {case['exit']}: {said}"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    if case["exit"]:
        message = [line for line in lines if not line.startswith(_FRAME)]
        if len(message) != 1 or placed(case["line"]) not in message[0]:
            return f"not one line holding {placed(case['line'])!r}: {said}"
    elif placed(case["stdout"]) not in done.stdout or len(lines) > 1:
        return f"stdout without {case['stdout']!r}, or more than one line on stderr: {said}"
    for secret in ("secret", "corpus-key"):
        if secret in done.stderr + done.stdout:
            return f"the output shows {secret!r}: {said}"
    after = _state(ws)
    changed = sorted(name for name, stat in before.items() if after.get(name) != stat)
    added = sorted(set(after) - set(before))
    if changed or added:
        return f"files changed {changed} or left behind {added}: {said}"
    return None


def test_every_bad_input_gets_one_line_and_harms_nothing(tmp_path):
    template = _template(tmp_path)
    with SwitchProxy(upstream_port=9) as silent, ThreadPoolExecutor(max_workers=2) as pool:
        silent.blackhole = True  # accepts, never answers
        url = f"http://127.0.0.1:{silent.port}"
        answers = list(
            pool.map(
                lambda indexed: _run_case(indexed[1], template, tmp_path, indexed[0], url),
                enumerate(CASES),
            )
        )
    wrong = [
        f"{case['name']}: {answer}" for case, answer in zip(CASES, answers, strict=False) if answer
    ]
    assert not wrong, f"{len(wrong)} of {len(CASES)} cases:\n" + "\n".join(wrong)


def test_the_corpus_covers_every_kind_of_input():
    """The issue's list of entry points, each with cases (and the corpus' own shape)."""
    assert len(CASES) >= 40 and len({case["name"] for case in CASES}) == len(CASES)
    for case in CASES:
        assert set(case) <= {"name", "args", "exit", "line", "stdout", "files", "env"}, case
        assert ("line" in case) == bool(case["exit"]), case
    text = (ROOT / "tests" / "corpus" / "cli.yaml").read_text()
    for section in (
        "cluster profiles",
        "--set values",
        "run names",
        "output folders",
        "manifests, videos, prompt files",
        "checkpoint references",
        "storage and tracking endpoints",
    ):
        assert f"# --- {section} " in text, section
