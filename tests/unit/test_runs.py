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
    assert runs.new_run_name(run, "a" * 100) == "a" * 100


@pytest.mark.parametrize("name", ["../escape", ".hidden", "a/b", "two\nlines", "a" * 101, "x:5"])
def test_a_run_name_that_cannot_name_a_folder_and_a_file_is_refused(tmp_path, name):
    with pytest.raises(runs.ConfigError, match="a run name is 1 to 100 letters, digits"):
        runs.new_run_name(_local_run(tmp_path), name)


def test_launches_in_the_same_second_get_different_names(tmp_path, monkeypatch):
    epoch = runs.time.gmtime(0)
    monkeypatch.setattr(runs.time, "gmtime", lambda *_: epoch)
    names = {runs.new_run_name(_local_run(tmp_path)) for _ in range(20)}
    assert len(names) == 20
    assert all(name.startswith("local-pretrain-19700101-000000-") for name in names)


def test_a_name_taken_under_another_storage_root_is_refused(tmp_path):
    _record(tmp_path / "first-root", "shared")
    with pytest.raises(runs.ConfigError, match="a run of that name exists"):
        runs.new_run_name(_local_run(tmp_path / "second-root"), "shared")
    assert runs.load_record("shared").run_dir.startswith(str(tmp_path / "first-root"))


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
        (["launch", "--cluster", "local", "--stage", "pretrain", "--from-base"], "sft only"),
        (["launch", "--cluster", "local", "--stage", "sft", "--from", "x", "--from-base"], "both"),
        (["launch", "--resume", "x", "--from-base"], "--resume takes no"),
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


def test_sft_from_base_starts_from_the_model_even_beside_a_pretrain_run(tmp_path):
    record = _record(tmp_path, "pre", exit_code=0)
    (Path(record.run_dir) / "checkpoint_2026-01-01_00-00-00.000000").mkdir()
    argv = ["launch", "--cluster", "local", "--stage", "sft", "--dry-run"]
    result = CliRunner().invoke(cli, [*argv, "--from-base"])
    assert result.exit_code == 0, result.output
    assert "init_from: null" in result.output and "checkpoint_2026" not in result.output


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


def _tracked(tmp_path, name: str, losses: list[float], uri: str | None = None):
    """A finished run whose MLflow run (a sqlite store) logged ``losses`` at steps 1..n."""
    from infra.tracking import open_run

    uri = uri or f"sqlite:///{tmp_path / 'mlflow.db'}"
    record = _record(tmp_path, name, exit_code=0, tracking_uri=uri)
    run = runs.read_run_config(record)
    run = run.model_copy(update={"tracking": run.tracking.model_copy(update={"uri": uri})})
    tracker = open_run(run, record.run_dir, name, {})
    tracker.log_rows([(n, 1000 * n, {"step": n, "loss": x}) for n, x in enumerate(losses, 1)])
    return record, tracker


def _row(output: str, name: str) -> list[str]:
    line = next(line for line in output.splitlines() if f" {name} " in line)
    return [cell.strip() for cell in line.strip("│ ").split("│")]


def test_runs_table_and_status_show_the_latest_step_and_loss_from_mlflow(tmp_path):
    _tracked(tmp_path, "alpha", [0.9, 0.8, 0.7])
    _, beta = _tracked(tmp_path, "beta", [1.5, 1.25])
    _record(tmp_path, "gamma", exit_code=0)  # never tracked: no mlflow_run.json
    table = CliRunner().invoke(cli, ["runs"])
    assert table.exit_code == 0, table.output
    # run, stage, cluster, state, step, loss, checkpoints, latest
    assert _row(table.output, "alpha")[3:6] == ["SUCCEEDED", "3", "0.7000"]
    assert _row(table.output, "beta")[4:6] == ["2", "1.2500"]
    assert _row(table.output, "gamma")[4:6] == ["-", "-"]
    status = CliRunner().invoke(cli, ["status", "beta"])
    assert "step:       2, loss 1.2500" in status.output
    assert f"run {beta.run_id}" in status.output


def test_an_mlflow_store_that_does_not_answer_gets_one_try_and_dashes(tmp_path):
    # A port that accepts and drops every connection: MLflow's own retries would come
    # back to it for minutes; `m2d runs` tries once and skips the store's other runs.
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    attempts = []

    def drop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            attempts.append(1)
            conn.close()

    threading.Thread(target=drop, daemon=True).start()
    uri = f"http://127.0.0.1:{server.getsockname()[1]}"
    for name in ("one", "two"):
        record = _record(tmp_path, name, exit_code=0, tracking_uri=uri)
        (Path(record.run_dir) / "mlflow_run.json").write_text('{"run_id": "0123"}')
    gone = tmp_path / "gone.db"
    record = _record(tmp_path, "three", exit_code=0, tracking_uri=f"sqlite:///{gone}")
    (Path(record.run_dir) / "mlflow_run.json").write_text('{"run_id": "0123"}')
    try:
        table = CliRunner().invoke(cli, ["runs"])
    finally:
        server.close()
    assert table.exit_code == 0, table.output
    for name in ("one", "two", "three"):
        assert _row(table.output, name)[4:6] == ["-", "-"]
    assert len(attempts) == 1
    assert not gone.exists()  # a missing sqlite store is not created by looking at it


def test_a_launch_whose_mlflow_store_does_not_answer_writes_nothing(tmp_path):
    from infra.processes import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    manifest = tmp_path / "pretrain.jsonl"
    manifest.write_text("")
    argv = ["launch", "--cluster", "local", "--stage", "pretrain"]
    argv += ["--set", f"storage.root={tmp_path / 'runs'}", "--set", f"tracking.uri={uri}"]
    result = CliRunner().invoke(cli, [*argv, "--set", f"data.pretrain={manifest}"])
    assert result.exit_code == 2, result.output
    assert f"tracking.uri {uri}: the MLflow server does not answer" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() and runs.recent_records() == []


@pytest.mark.parametrize("key", ["pretrain", "pretrain_latents"])
def test_a_local_launch_whose_training_input_is_missing_writes_nothing(tmp_path, key):
    missing = tmp_path / "nowhere" / key
    argv = ["launch", "--cluster", "local", "--stage", "pretrain"]
    argv += ["--set", f"storage.root={tmp_path / 'runs'}", "--set", f"data.{key}={missing}"]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2, result.output
    assert f"data.{key} = {missing}: not found" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() and runs.recent_records() == []


def test_the_job_checks_its_input_before_ray_starts_and_fails_the_mlflow_run(tmp_path, capsys):
    # A remote run's inputs are the cluster's: the job's driver checks them, before Ray
    # starts, and ends the MLflow run the launcher opened for it.
    from mlflow.tracking import MlflowClient

    from infra.job_entry import spec_argv
    from infra.job_specs import TrainJobSpec
    from trainer import job

    missing = tmp_path / "moved.jsonl"
    record, tracker = _tracked(tmp_path, "remote", [1.0])
    run = runs.read_run_config(record)
    run = run.model_copy(
        update={
            "data": run.data.model_copy(update={"pretrain": str(missing)}),
            "tracking": run.tracking.model_copy(update={"uri": record.tracking_uri}),
        }
    )
    Path(record.config_uri).write_text(run.model_dump_json())
    code = job.main(spec_argv(TrainJobSpec(config=record.config_uri)))
    assert code == 2
    assert f"error: data.pretrain = {missing}: not found" in capsys.readouterr().err
    status = MlflowClient(record.tracking_uri).get_run(tracker.run_id).info.status
    assert status == "FAILED"


def test_a_stopped_local_run_reads_stopped_not_failed_or_lost(tmp_path):
    import subprocess
    import sys

    # A process group standing in for the job (its driver and Ray's processes).
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    job = subprocess.Popen(sleeper, start_new_session=True)
    record = _record(tmp_path, "local-run", pid=job.pid)
    assert CliRunner().invoke(cli, ["status", "local-run"]).output.count("RUNNING") == 1
    result = CliRunner().invoke(cli, ["stop", "local-run"])
    assert result.exit_code == 0 and "local-run: stopping" in result.output
    assert job.wait(timeout=30) == -15
    assert runs.load_record("local-run").stopped
    assert "state:      STOPPED" in CliRunner().invoke(cli, ["status", "local-run"]).output
    # Its launcher, still in the foreground, records the exit status: still STOPPED.
    record = runs.load_record("local-run")
    record.exit_code = -15
    record.save()

    assert runs.local_state(record) == "STOPPED"
    record.stopped = False  # the same exit without a stop asked for is a failure
    assert runs.local_state(record) == "FAILED (exit -15)"
    assert "local-run: was not running" in CliRunner().invoke(cli, ["stop", "local-run"]).output


@pytest.fixture
def stand_in_job():
    """A process group standing in for a local run's job; killed at the end."""
    import subprocess
    import sys

    job = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    yield job
    job.kill()
    job.wait()


def test_stop_never_signals_a_process_that_took_the_jobs_pid(tmp_path, stand_in_job):
    from infra.processes import process_start

    # The launcher died, its job ended, and the kernel gave the pid to another process.
    started = process_start(stand_in_job.pid)
    _record(tmp_path, "gone", pid=stand_in_job.pid, pid_start=started - 1)
    assert "state:      LOST" in CliRunner().invoke(cli, ["status", "gone"]).output
    result = CliRunner().invoke(cli, ["stop", "gone"])
    assert result.exit_code == 0 and "gone: was not running" in result.output
    assert stand_in_job.poll() is None  # not signalled
    assert not runs.load_record("gone").stopped
    # The job itself (its own start time) is stopped as before.
    _record(tmp_path, "live", pid=stand_in_job.pid, pid_start=started)
    assert "live: stopping" in CliRunner().invoke(cli, ["stop", "live"]).output
    assert stand_in_job.wait(timeout=30) == -15


def test_a_run_whose_job_runs_is_not_resumed(tmp_path, monkeypatch, stand_in_job):
    from infra.processes import process_start

    def started(*args, **kwargs):
        raise AssertionError("a second job started on the run's folder")

    monkeypatch.setattr("orchestrator.submit.run_local", started)
    pid = stand_in_job.pid
    _record(tmp_path, "busy", pid=pid, pid_start=process_start(pid))
    result = CliRunner().invoke(cli, ["launch", "--resume", "busy"])
    assert result.exit_code == 2, result.output
    assert f"run busy is running (pid {pid}); wait for it, or stop it" in result.output
    assert runs.load_record("busy").pid == pid


def _snapshot(*roots: Path) -> dict[Path, tuple[int, bytes]]:
    return {
        path: (path.stat().st_mtime_ns, path.read_bytes())
        for root in roots
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_resume_dry_run_changes_nothing(tmp_path, m2d_home, monkeypatch, with_checkpoint):
    record = _record(tmp_path, "r1", exit_code=1)
    checkpoint = Path(record.run_dir) / "checkpoint_2026-01-01_00-00-00.000000"
    if with_checkpoint:
        checkpoint.mkdir()

    def started(*args, **kwargs):
        raise AssertionError("--dry-run started the job")

    monkeypatch.setattr("orchestrator.submit.run_local", started)
    monkeypatch.setattr("orchestrator.submit.submit_remote", started)
    before = _snapshot(Path(record.run_dir), m2d_home)
    result = CliRunner().invoke(cli, ["launch", "--resume", "r1", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "# Resolved run configuration (nothing submitted)" in result.output
    if with_checkpoint:
        assert f"--resume r1: it would continue from {checkpoint}" in result.output
    else:
        assert "--resume r1: no checkpoint yet, it would start again at step 0" in result.output
    assert _snapshot(Path(record.run_dir), m2d_home) == before
    assert not list(Path(record.run_dir).glob("mlflow_run.json"))


def test_a_resume_on_other_workers_keeps_the_global_batch_and_the_earlier_config(
    tmp_path, m2d_home, monkeypatch
):
    """`--resume RUN --set workers.num_workers=M`: --dry-run shows the resized run and
    writes nothing; the resume rewrites run_config.json (gradient accumulation following
    the workers, the global batch the run's) and keeps the config it replaces."""
    record = _record(tmp_path, "r1", exit_code=1)
    config = Path(record.run_dir) / "run_config.json"
    original = config.read_text()
    before = _snapshot(Path(record.run_dir), m2d_home)
    resize = ["launch", "--resume", "r1", "--set", "workers.num_workers=1"]
    shown = CliRunner().invoke(cli, [*resize, "--dry-run"])
    assert shown.exit_code == 0, shown.output
    assert "num_workers: 1" in shown.output and '"gradient_accumulation_steps": 2' in shown.output
    assert _snapshot(Path(record.run_dir), m2d_home) == before

    started = []
    monkeypatch.setattr("orchestrator.submit.run_local", lambda rec, **kw: started.append(rec))
    result = CliRunner().invoke(cli, resize)
    assert result.exit_code == 0, result.output
    assert "r1: now 1 worker(s) on 1 node(s), 1 x 2 micro-batch(es) each per step" in result.output
    run = runs.read_run_config(runs.load_record("r1"))
    assert (run.workers.num_workers, run.deepspeed.gradient_accumulation) == (1, 2)
    assert run.recipe.global_batch == 2 and len(started) == 1
    kept = list(config.parent.glob("run_config.*.json"))
    assert len(kept) == 1 and kept[0].read_text() == original
    assert f"its earlier config: {kept[0]}" in result.output


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("recipe.learning_rate=1", "--resume changes only where the run trains"),
        ("workers.num_workers=3", "pick a number of workers that divides 2"),
        ("deepspeed.gradient_accumulation=3", "global batch 2 != micro_batch_per_gpu 1 x"),
        ("workers.gpus_per_worker=-1", "workers.gpus_per_worker"),
    ],
)
def test_a_resume_refuses_what_would_change_the_run(tmp_path, assignment, message):
    record = _record(tmp_path, "r1", exit_code=1)
    config = Path(record.run_dir) / "run_config.json"
    original = config.read_text()
    result = CliRunner().invoke(cli, ["launch", "--resume", "r1", "--set", assignment])
    assert result.exit_code == 2 and message in result.output, result.output
    assert config.read_text() == original and not list(config.parent.glob("run_config.*.json"))


def test_ctrl_c_waits_for_the_job_before_the_record_says_stopped_and_exits_130(
    tmp_path, monkeypatch
):
    """The job (a stand-in) is signalled, still writes its last checkpoint, and only then
    is the run marked STOPPED; the launcher exits 130 whatever the job's own status."""

    from orchestrator import console, submit

    record = _record(tmp_path, "interrupted")
    seen, started = tmp_path / "seen.json", tmp_path / "started"
    job = f"""
import json, pathlib, signal, sys, time
def stop(*_):
    record = json.loads(pathlib.Path({str(runs.registry_dir() / "interrupted.json")!r}).read_text())
    pathlib.Path({str(seen)!r}).write_text(json.dumps({{"stopped": record["stopped"]}}))
    time.sleep(0.5)  # the workers' last checkpoint
    pathlib.Path({str(tmp_path / "checkpoint")!r}).write_text("saved")
    sys.exit(1)
signal.signal(signal.SIGTERM, stop)
pathlib.Path({str(started)!r}).write_text("up")
time.sleep(60)
"""
    monkeypatch.setattr(submit, "job_command", lambda rec, python: [python, "-c", job])

    def ctrl_c(self, process):
        while not started.exists():
            assert process.poll() is None
            runs.time.sleep(0.05)
        raise KeyboardInterrupt

    monkeypatch.setattr(console.JobConsole, "relay", ctrl_c)
    assert submit.run_local(record) == 130
    assert json.loads(seen.read_text()) == {"stopped": False}  # not while it still ran
    assert (tmp_path / "checkpoint").read_text() == "saved"
    after = runs.load_record("interrupted")
    assert after.stopped and after.exit_code == 1


def test_a_first_submission_ray_refuses_leaves_no_run_and_the_name_free(
    tmp_path, m2d_home, monkeypatch
):
    """Ray refuses the job (its agent never came up): the run folder the launcher made and
    its record go, so the same --name launches again; a user's own file there stays."""
    from infra.errors import ServiceError

    calls = []

    def refuse(record, run, submission_id=None):
        calls.append(submission_id)
        raise ServiceError("Ray refused the job: the cluster's job agent did not answer")

    monkeypatch.setattr("orchestrator.ray_jobs.job_client", lambda address: object())
    monkeypatch.setattr("orchestrator.submit.submit_remote", refuse)
    root = tmp_path / "runs"
    args = [
        "launch", "--cluster", "local", "--stage", "pretrain", "--name", "far", "--force",
        "--set", "ray.address=http://127.0.0.1:8265", "--set", f"storage.root={root}",
        "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "--set", "data.synthetic=true",
    ]  # fmt: skip
    for _attempt in range(2):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert "Ray refused the job" in result.output
        assert "already exists" not in result.output  # the name was free again
        assert not (root / "far").exists()
        assert not list((m2d_home / "runs").glob("far*"))
    assert calls == ["far", "far"]

    (root / "far").mkdir(parents=True)
    (root / "far" / "notes.txt").write_text("mine")
    monkeypatch.setattr(
        "orchestrator.runs.create_run_folder",
        lambda run, name: str(root / "far" / "run_config.json"),
    )
    (root / "far" / "run_config.json").write_text("{}")
    assert CliRunner().invoke(cli, args).exit_code == 2
    assert (root / "far" / "notes.txt").read_text() == "mine"  # only m2d's own files go
    assert not (root / "far" / "run_config.json").exists()


def test_status_and_runs_name_the_last_complete_checkpoint_not_the_newest_folder(tmp_path):
    """The run's own record says which checkpoint is last complete: a torn newer one (a
    disk that filled during its save) is named with why it does not count."""
    from infra.checkpoint_layout import write_file_list, write_manifest

    record = _record(tmp_path, "torn", exit_code=1)
    for step in (2, 4):
        folder = Path(record.run_dir) / f"checkpoint_{step:08d}"
        (folder / "deepspeed").mkdir(parents=True)
        (folder / "deepspeed" / "model.pt").write_bytes(b"w" * 100)
        write_file_list(folder, 0)
        assert write_manifest(str(folder), None, world_size=1) is None
    (Path(record.run_dir) / "checkpoint_00000004" / "deepspeed" / "model.pt").write_bytes(b"")
    status = CliRunner().invoke(cli, ["status", "torn"])
    assert status.exit_code == 0, status.output
    assert (
        f"checkpoint: {record.run_dir}/checkpoint_00000002 (last complete; checkpoint_00000004 "
        "is incomplete (deepspeed/model.pt is 0 bytes, listed as 100))"
    ) in status.output
    table = CliRunner().invoke(cli, ["runs"])
    assert _row(table.output, "torn")[6:8] == ["2", "checkpoint_00000002"]
