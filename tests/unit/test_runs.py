"""Run bookkeeping: run folders are never overwritten, records find runs, bad names fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator import profiles, runs
from orchestrator.cli import cli

CLUSTERS = Path(__file__).resolve().parents[2] / "clusters"


@pytest.fixture(autouse=True)
def m2d_home(tmp_path, monkeypatch):
    monkeypatch.setenv("M2D_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _local_run(tmp_path, stage="pretrain"):
    loaded = profiles.load_profile(CLUSTERS / "local.yaml")
    root = {"storage": {"root": str(tmp_path / "runs")}}
    return runs.with_absolute_paths(profiles.resolve(loaded, stage, root))


def test_run_folder_holds_the_resolved_config(tmp_path):
    run = _local_run(tmp_path)
    uri = runs.create_run_folder(run, "r1")
    assert uri == str(tmp_path / "runs" / "r1" / "run_config.json")
    saved = json.loads(Path(uri).read_text())
    assert saved["recipe"]["steps"] == run.recipe.steps and saved["cluster"] == "local"


def test_existing_run_folder_is_never_overwritten(tmp_path):
    run = _local_run(tmp_path)
    uri = runs.create_run_folder(run, "r1")
    Path(uri).write_text("precious")
    with pytest.raises(runs.ConfigError, match=r"already exists.*--resume r1"):
        runs.create_run_folder(run, "r1")
    assert Path(uri).read_text() == "precious"


def test_run_names(tmp_path):
    run = _local_run(tmp_path, "sft")
    assert runs.new_run_name(run).startswith("local-sft-")
    assert runs.new_run_name(run, "mine") == "mine"
    with pytest.raises(runs.ConfigError, match="cannot contain '/'"):
        runs.new_run_name(run, "../escape")


def _record(tmp_path, name="r1", **changes):
    run = _local_run(tmp_path)
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


def test_records_round_trip_and_list_newest_first(tmp_path):
    _record(tmp_path, "old", exit_code=0)
    _record(tmp_path, "new")
    assert [r.name for r in runs.recent_records()] == ["new", "old"]
    assert runs.load_record("old").exit_code == 0
    assert runs.read_run_config(runs.load_record("old")).cluster == "local"


def test_checkpoints_are_listed_oldest_first(tmp_path):
    record = _record(tmp_path)
    for stamp in ("2026-01-02_00-00-00.000000", "2026-01-01_00-00-00.000000"):
        (Path(record.run_dir) / f"checkpoint_{stamp}").mkdir()
    (Path(record.run_dir) / "not_a_checkpoint").mkdir()
    assert [Path(c).name for c in runs.checkpoints(record)] == [
        "checkpoint_2026-01-01_00-00-00.000000",
        "checkpoint_2026-01-02_00-00-00.000000",
    ]
    assert runs.latest_checkpoint(record).endswith("2026-01-02_00-00-00.000000")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["status", "nope"], "no run named 'nope'"),
        (["logs", "nope"], "no run named 'nope'"),
        (["stop", "nope"], "no run named 'nope'"),
        (["launch", "--resume", "nope"], "no run named 'nope'"),
        (["launch", "--cluster", "local"], "give --cluster and --stage"),
        (["launch", "--resume", "x", "--stage", "sft"], "--resume takes no"),
        (["launch", "--cluster", "local", "--stage", "sft"], "no finished pretrain run"),
        (["launch", "--cluster", "local", "--stage", "pretrain", "--from", "x"], "sft only"),
    ],
)
def test_run_commands_refuse_clearly(argv, message):
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_sft_from_a_run_without_checkpoints_is_refused(tmp_path):
    _record(tmp_path, "pre", exit_code=0)
    result = CliRunner().invoke(cli, ["launch", "--cluster", "local", "--stage", "sft"])
    assert result.exit_code == 2
    assert "run pre has no checkpoint yet" in result.output


def test_sft_dry_run_starts_from_the_latest_pretrain_checkpoint(tmp_path):
    record = _record(tmp_path, "pre", exit_code=0)
    (Path(record.run_dir) / "checkpoint_2026-01-01_00-00-00.000000").mkdir()
    result = CliRunner().invoke(
        cli, ["launch", "--cluster", "local", "--stage", "sft", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert f"init_from: {record.run_dir}/checkpoint_2026-01-01_00-00-00.000000" in result.output


def test_runs_table_and_status_of_a_finished_local_run(tmp_path):
    _record(tmp_path, "done", exit_code=0)
    table = CliRunner().invoke(cli, ["runs"])
    assert table.exit_code == 0 and "done" in table.output and "SUCCEEDED" in table.output
    status = CliRunner().invoke(cli, ["status", "done"])
    assert "state:      SUCCEEDED" in status.output


def test_relative_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = profiles.load_profile(CLUSTERS / "local.yaml")
    latents = {"data": {"pretrain_latents": "lat/pre", "sft_latents": "s3://b/lat"}}
    run = runs.with_absolute_paths(profiles.resolve(loaded, "pretrain", latents))
    assert run.data.pretrain_latents == str(tmp_path / "lat" / "pre")
    assert run.data.sft_latents == "s3://b/lat"
    assert run.storage.root == str(tmp_path / "runs")
    assert run.data.pretrain == str(tmp_path / "data" / "synth" / "pretrain.jsonl")
    assert run.tracking.uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert run.model.source == "tiny"
    remote = runs.with_absolute_paths(
        profiles.resolve(profiles.load_profile(CLUSTERS / "a100x64.yaml"), "pretrain", {})
    )
    assert remote.storage.root == "s3://m2d-checkpoints/runs"
    assert remote.tracking.uri == "http://mlflow.internal:5000"


def test_each_remote_start_of_a_run_gets_its_own_ray_job_name(tmp_path):
    from orchestrator.commands.launch import _next_job_id

    record = runs.RunRecord(
        name="r", cluster="c", stage="pretrain", run_dir="d", config_uri="u", kind="remote"
    )
    assert record.ray_job == "r" and _next_job_id(record) == "r"
    record.job_id = "r"
    assert _next_job_id(record) == "r-resume-1"
    record.job_id = "r-resume-1"
    assert _next_job_id(record) == "r-resume-2" and record.ray_job == "r-resume-1"
