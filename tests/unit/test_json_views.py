"""Every view scriptable (issue 29 point 3): `--json` on `runs`, `status`, `checkpoints`
and `cluster list` prints one JSON document and a newline, with the fields their help
names, agreeing with the tables; tables piped to a file are never cut to 80 columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from infra.checkpoint_layout import write_file_list, write_manifest
from orchestrator import profiles, runs
from orchestrator.cli import cli

CLUSTERS = Path(__file__).resolve().parents[2] / "clusters"


@pytest.fixture(autouse=True)
def m2d_home(tmp_path, monkeypatch):
    monkeypatch.setenv("M2D_HOME", str(tmp_path / "home"))


def _record(tmp_path, name: str, **changes) -> runs.RunRecord:
    loaded = profiles.load_profile(CLUSTERS / "local.yaml")
    run = runs.with_absolute_paths(
        profiles.resolve(loaded, "pretrain", {"storage": {"root": str(tmp_path / "runs")}})
    )
    record = runs.RunRecord(
        name=name,
        cluster="local",
        stage="pretrain",
        run_dir=runs.run_dir(run, name),
        config_uri=runs.create_run_folder(run, name),
        kind="local",
        storage=run.storage.model_dump(),
        **changes,
    )
    record.save()
    return record


def _checkpoint(record: runs.RunRecord, step: int, size: int = 100) -> Path:
    folder = Path(record.run_dir) / f"checkpoint_{step:08d}"
    (folder / "deepspeed").mkdir(parents=True)
    (folder / "deepspeed" / "model.pt").write_bytes(b"w" * size)
    write_file_list(folder, 0)
    assert write_manifest(str(folder), None, world_size=1) is None
    return folder


def _json(argv: list[str], exit_code: int = 0):
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == exit_code, result.output
    document, _, rest = result.stdout.partition("\n")
    assert rest == ""  # one line, ending in a newline
    return json.loads(document)


@pytest.fixture
def torn(tmp_path) -> runs.RunRecord:
    """A run whose step-2 checkpoint is complete and whose step-4 one lost a file's bytes."""
    record = _record(tmp_path, "torn", exit_code=1)
    _checkpoint(record, 2)
    step4 = _checkpoint(record, 4)
    (step4 / "deepspeed" / "model.pt").write_bytes(b"")
    return record


def test_status_json_names_the_last_complete_checkpoint_and_why_newer_ones_do_not_count(torn):
    document = _json(["status", "torn", "--json"])
    assert document == {
        "name": "torn",
        "stage": "pretrain",
        "cluster": "local",
        "state": "FAILED",
        "exit_code": 1,
        "where": "local",
        "folder": torn.run_dir,
        "step": None,
        "loss": None,
        "mlflow": None,
        "checkpoint": f"{torn.run_dir}/checkpoint_00000002",
        "incomplete": [
            {
                "checkpoint": f"{torn.run_dir}/checkpoint_00000004",
                "problem": "deepspeed/model.pt is 0 bytes, listed as 100",
            }
        ],
    }


def test_runs_json_lists_newest_first_as_the_table_does(tmp_path, torn):
    _record(tmp_path, "fresh")
    rows = _json(["runs", "--json"])
    assert [row["name"] for row in rows] == ["fresh", "torn"]
    assert rows[1]["checkpoints"] == 2
    assert rows[1]["checkpoint"] == f"{torn.run_dir}/checkpoint_00000002"
    assert rows[0]["checkpoints"] == 0 and rows[0]["checkpoint"] is None
    assert (rows[1]["state"], rows[1]["exit_code"]) == ("FAILED", 1)
    assert "FAILED (exit 1)" in CliRunner().invoke(cli, ["runs"]).stdout  # the table says all
    assert set(rows[0]) == {
        "name", "stage", "cluster", "state", "exit_code", "step", "loss", "checkpoints",
        "checkpoint",
        "folder", "mlflow",
    }  # fmt: skip


def test_checkpoints_json_and_table_say_the_same_and_a_damaged_one_exits_1(torn):
    rows = _json(["checkpoints", "torn", "--json"], exit_code=1)
    assert [(r["checkpoint"], r["state"], r["damaged"]) for r in rows] == [
        ("checkpoint_00000002", "complete", False),
        ("checkpoint_00000004", "incomplete", True),
    ]
    assert rows[0]["bytes"] > 100 and rows[0]["problem"] is None and rows[0]["manifest"]
    table = CliRunner().invoke(cli, ["checkpoints", "torn"])
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["checkpoint", "state", "size", "/", "problem"]
    assert lines[1].split()[:2] == ["checkpoint_00000002", "complete"]
    assert lines[2].split()[:2] == ["checkpoint_00000004", "incomplete"]
    assert table.exit_code == 1


def test_checkpoints_json_of_a_run_without_any_is_an_empty_array(tmp_path):
    _record(tmp_path, "empty")
    assert _json(["checkpoints", "empty", "--json"]) == []


def test_cluster_list_json_has_every_profile_and_names_an_invalid_ones_problem(tmp_path):
    folder = tmp_path / "clusters"
    folder.mkdir()
    (folder / "good.yaml").write_text((CLUSTERS / "local.yaml").read_text())
    (folder / "bad.yaml").write_text("extends: local\nworkers: {num_workerz: 2}\n")
    (folder / "local.yaml").write_text((CLUSTERS / "local.yaml").read_text())
    rows = {
        row["name"]: row
        for row in _json(["--clusters-dir", str(folder), "cluster", "list", "--json"])
    }
    assert set(rows) == {"bad", "good", "local"}
    assert rows["good"]["valid"] and rows["good"]["num_workers"] == 2
    assert rows["good"]["ray_address"] == "local" and rows["good"]["gpus_per_worker"] == 0
    assert not rows["bad"]["valid"] and "num_workerz" in rows["bad"]["problem"]
    assert rows["bad"]["num_workers"] is None


def test_a_piped_table_is_never_cut(tmp_path):
    """CliRunner's stdout is no terminal, like a pipe: a long description is printed whole
    (rich cuts a table to 80 columns when it cannot ask a terminal its width)."""
    folder = tmp_path / "clusters"
    folder.mkdir()
    description = "a profile whose description runs on " + "and on " * 20 + "to its end"
    local = (CLUSTERS / "local.yaml").read_text()
    (folder / "local.yaml").write_text(local)
    (folder / "long.yaml").write_text(f"extends: local\ndescription: {description}\n")
    table = CliRunner().invoke(cli, ["--clusters-dir", str(folder), "cluster", "list"])
    assert table.exit_code == 0, table.output
    assert description in table.stdout


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["status", "torn"], ["status"]),
        (["runs"], ["runs"]),
        (["checkpoints", "torn"], ["checkpoints"]),
        (["cluster", "list"], ["cluster", "list"]),
    ],
)
def test_each_json_field_is_named_in_the_commands_help(torn, argv, command):
    document = _json([*argv, "--json"], exit_code=1 if command == ["checkpoints"] else 0)
    fields = document if isinstance(document, dict) else document[0]
    helped = " ".join(CliRunner().invoke(cli, [*command, "--help"]).output.split())
    missing = [field for field in fields if field not in helped]
    assert not missing, f"{command}: {missing} not in its --help"
