"""The training job for real: Ray Train, 2 CPU workers, DeepSpeed ZeRO, S3 and MLflow servers.

The runs are ``training_runs.make_run``'s; resuming is ``test_resume.py``'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from m2d_cli import M2D as M2D_CLI
from m2d_cli import local_env, register_run
from s3_proxy import CountingProxy
from training_runs import (
    EVERY,
    ROOT,
    STEPS,
    make_run,
    mlflow_client,
    module_weights,
    run_job,
)

from infra.checkpoint_layout import WEIGHTS
from infra.config import RunConfig, StorageConfig
from infra.job_entry import spec_argv
from infra.job_specs import ExportSpec, TrainJobSpec
from infra.run_folder import MANIFEST

pytestmark = pytest.mark.integration

PER_STEP_METRICS = (
    "loss",
    "lr",
    "grad_norm",
    "samples_per_s",
    "tokens_per_s",
    "step_time_s",
    "peak_memory_mib",
    "peak_memory_mib_rank0",
    "peak_memory_mib_rank1",
)


def test_pretrain_zero2_checkpoints_in_s3_and_metrics_in_mlflow(s3_pretrain, mlflow_server):
    fs, bucket = s3_pretrain["fs"], s3_pretrain["bucket"]
    summary = s3_pretrain["stdout"].strip().splitlines()[-1]
    assert summary.startswith(f"run pre-z2 finished: step {STEPS}/{STEPS}"), summary
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/runs/pre-z2"))
    assert [n for n in names if n.startswith("checkpoint_0")] == [
        "checkpoint_00000003",
        "checkpoint_00000006",
    ]
    final = f"{bucket}/runs/pre-z2/checkpoint_00000006"
    shards = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{final}/deepspeed"))
    assert shards == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{final}/ranks")) == [
        "files_rank_0.json",
        "files_rank_1.json",
        "rank_0.pt",
        "rank_1.pt",
    ]
    manifest = json.loads(fs.cat(f"{final}/manifest.json"))
    assert manifest["world_size"] == 2
    assert set(manifest["files"]) == {
        p.removeprefix(f"{final}/") for p in fs.find(final) if not p.endswith("/manifest.json")
    }
    state = json.loads(fs.cat(f"{final}/trainer_state.json"))
    assert state["step"] == STEPS and state["world_size"] == 2
    saved_run = RunConfig.model_validate_json(fs.cat(f"{final}/run_config.json"))
    assert saved_run == s3_pretrain["run"]

    client = mlflow_client(mlflow_server)
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["cluster"] == "local" and run.data.tags["stage"] == "pretrain"
    assert len(run.data.tags["git_commit"]) == 40
    assert run.data.tags["checkpoint.latest"] == f"s3://{final}"
    listed = client.list_artifacts(run.info.run_id, "checkpoints")
    assert [a.path for a in listed] == [
        "checkpoints/checkpoint_00000003.json",
        "checkpoints/checkpoint_00000006.json",
    ]
    local = client.download_artifacts(run.info.run_id, "checkpoints/checkpoint_00000006.json")
    assert json.loads(Path(local).read_text())["uri"] == f"s3://{final}"
    skipped = client.get_metric_history(run.info.run_id, "data_skipped_total")
    assert [(m.step, m.value) for m in skipped] == [(EVERY, 0.0), (STEPS, 0.0)]
    assert run.data.params["recipe.steps"] == str(STEPS)
    assert run.data.params["storage.endpoint_url"] == s3_pretrain["run"].storage.endpoint_url
    for key in PER_STEP_METRICS:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == list(range(1, STEPS + 1)), key
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert all(0 < loss < 10 for loss in losses)
    assert not client.get_metric_history(run.info.run_id, "loss_extension")  # pretrain


def test_sft_zero3_from_pretrain_checkpoint(s3_pretrain, mlflow_server, synth_data, tmp_path):
    """Stage chaining: SFT (ZeRO-3, per-sample task draws) starts from the ZeRO-2 pretrain.

    Data and init_from come from the run config alone, as the launcher writes it.
    """
    root = tmp_path / "runs"
    (root / "sft-z3").mkdir(parents=True)
    pretrained = s3_pretrain["local"] / f"checkpoint_{STEPS:08d}"
    run = make_run(
        {"root": str(root)},
        mlflow_server,
        stage="sft",
        deepspeed__zero_stage=3,
        recipe__task_draw="per_sample",
        data__sft=str(synth_data / "sft.jsonl"),
    ).model_copy(update={"init_from": str(pretrained)})
    config = root / "sft-z3" / "run_config.json"
    config.write_text(run.model_dump_json())
    done = run_job(str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"initialised the transformer from {pretrained}" in done.stdout + done.stderr
    state = json.loads((root / "sft-z3" / "checkpoint_00000006" / "trainer_state.json").read_text())
    client = mlflow_client(mlflow_server)
    normal = client.get_metric_history(state["mlflow_run_id"], "loss_normal")
    extension = client.get_metric_history(state["mlflow_run_id"], "loss_extension")
    assert normal and extension  # 12 per-sample draws at p = 0.5 (seed 0) give both tasks
    pretrain_state = json.loads((pretrained / "trainer_state.json").read_text())
    tags = client.get_run(state["mlflow_run_id"]).data.tags
    # Linked, not nested: MLflow's table would fold the SFT run under the pretrain one.
    assert tags["m2d.started_from"] == pretrain_state["mlflow_run_id"]
    assert "mlflow.parentRunId" not in tags and "Started from [" in tags["mlflow.note.content"]
    shards = sorted(
        p.name for p in (root / "sft-z3" / "checkpoint_00000006" / "deepspeed").iterdir()
    )
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards
    # ZeRO-3's weights file is gathered from the partitions: the shards' weights exactly.
    from infra.checkpoint_layout import consolidated_state_dict, read_weights

    final = root / "sft-z3" / "checkpoint_00000006"
    written, merged = read_weights(str(final), None), consolidated_state_dict(final)
    assert written.keys() == merged.keys()
    assert all(torch.equal(written[k], merged[k]) for k in merged)


def test_checkpoints_carry_their_weights_and_readers_read_only_them(
    s3_pretrain, s3_endpoint, mlflow_server, synth_data, tmp_path, caplog
):
    """SFT (ZeRO-3) from an S3 checkpoint: one rank reads the weights file - the model's
    bytes, no optimizer shard - and the other gets them from DeepSpeed's start-up
    broadcast; a sampler reads only the file too (every rank used to download and merge
    the whole checkpoint). Old checkpoints without the file still load, by merging their
    shards."""
    from infra.checkpoint_layout import consolidated_state_dict, read_weights
    from infra.job_specs import CheckpointSpec, SampleJobSpec
    from infra.run_folder import RUN_CONFIG, TRAINER_STATE
    from sampler.checkpoint_info import describe_checkpoint
    from sampler.models import load_pipeline

    fs, bucket = s3_pretrain["fs"], s3_pretrain["bucket"]
    checkpoint = f"{bucket}/runs/pre-z2/checkpoint_{STEPS:08d}"
    local = s3_pretrain["local"] / f"checkpoint_{STEPS:08d}"
    # The file holds what the shards hold: ZeRO-2 fp32, the master weights exactly.
    merged = consolidated_state_dict(local)
    weights = read_weights(str(local), None)
    assert weights.keys() == merged.keys()
    assert all(torch.equal(weights[k], merged[k]) for k in merged)
    size = fs.size(f"{checkpoint}/{WEIGHTS}")
    optimizer = sum(fs.size(p) for p in fs.find(f"{checkpoint}/deepspeed") if "optim" in p)
    assert optimizer > 1.5 * size  # Adam's two moments and the fp32 partitions

    with CountingProxy(s3_endpoint) as proxy:
        root = tmp_path / "runs"
        (root / "sft-read").mkdir(parents=True)
        run = make_run(
            {"root": str(root), "endpoint_url": proxy.url},
            mlflow_server,
            stage="sft",
            deepspeed__zero_stage=3,  # no engine broadcast: each rank keeps its own copy
            recipe__steps=1,
            fault_tolerance__checkpoint_every=1,
            data__sft=str(synth_data / "sft.jsonl"),
        ).model_copy(update={"init_from": f"s3://{checkpoint}"})
        (root / "sft-read" / "run_config.json").write_text(run.model_dump_json())
        done = run_job(str(root / "sft-read" / "run_config.json"))
        assert done.returncode == 0, done.stderr[-3000:]
        readers = proxy.bytes_by_pid(f"{checkpoint}/{WEIGHTS}")
        assert list(readers.values()) == [size], readers  # one rank, the file once
        # Besides it, only the driver's look at the source run (its MLflow run id) and the
        # manifest the weights file's sha256 is checked against.
        small = {f"{checkpoint}/{name}" for name in (WEIGHTS, TRAINER_STATE, RUN_CONFIG, MANIFEST)}
        assert proxy.keys_read(checkpoint) <= small, proxy.keys_read(checkpoint)
        assert sum(proxy.bytes_by_pid(checkpoint).values()) < size + 16_384
        # Step 1 runs at lr 0 (WarmupLR), so the gathered partitions of both ranks are
        # what the file holds: rank 1, which read nothing, got rank 0's weights.
        started = read_weights(str(root / "sft-read" / "checkpoint_00000001"), None)
        assert all(torch.equal(started[k], merged[k]) for k in merged)

        proxy.clear()
        storage = StorageConfig(root=f"s3://{bucket}/runs", endpoint_url=proxy.url)
        source = CheckpointSpec(uri=f"s3://{checkpoint}", label="ds")
        spec = SampleJobSpec(
            cluster="local",
            checkpoints=[source],
            prompts="unused.jsonl",
            out=str(tmp_path / "samples"),
            model=run.model,
            recipe=run.recipe,
            storage=storage,
        )
        pipeline = load_pipeline(spec, source, describe_checkpoint(spec, source))
        assert proxy.bytes_by_pid(f"{checkpoint}/{WEIGHTS}") == {os.getpid(): size}
        assert proxy.keys_read(f"{checkpoint}/deepspeed") == set()
        for key, value in pipeline.transformer.state_dict().items():
            assert torch.equal(value, merged[key.removeprefix("transformer.")]), key

    old = tmp_path / "old"
    shutil.copytree(local, old, ignore=shutil.ignore_patterns("weights"))
    with caplog.at_level("WARNING"):
        again = read_weights(str(old), None)
    assert f"has no {WEIGHTS}" in caplog.text
    assert all(torch.equal(again[k], merged[k]) for k in merged)


def test_bad_config_exits_2_with_one_line(tmp_path):
    done = run_job(str(tmp_path / "nope" / "run_config.json"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "nope: no run_config.json there" in done.stderr


def test_missing_manifest_exits_2_before_ray_starts(tmp_path, mlflow_server):
    (tmp_path / "runs" / "no-data").mkdir(parents=True)
    config = tmp_path / "runs" / "no-data" / "run_config.json"
    run = make_run(
        {"root": str(tmp_path / "runs")}, mlflow_server, data__pretrain=None, data__sft=None
    )
    config.write_text(run.model_dump_json())
    done = run_job(str(config))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: stage pretrain needs its manifest: set data.pretrain in the run config (or "
        "data.pretrain_latents to precomputed latents, or data.synthetic: true for a run "
        "without files); once fixed, `m2d launch --resume no-data` starts the run"
    )


def test_a_user_error_found_by_the_job_leaves_a_run_resume_starts(tmp_path):
    """A validation prompt file missing is found by the job, after the run's folder and
    record exist: one line, exit 2, and once the file is there `--resume` trains the run."""
    import subprocess

    from m2d_cli import M2D, ROOT, local_env

    env = local_env(M2D_HOME=str(tmp_path / "home"))
    prompts = tmp_path / "validation.jsonl"
    sets = {
        "data.synthetic": "true",
        "storage.root": str(tmp_path / "runs"),
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "recipe.steps": "2",
        "recipe.warmup_steps": "1",
        "recipe.validation.every": "2",
        "recipe.validation.prompts": str(prompts),
    }
    flags = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]

    def m2d(*args):
        return subprocess.run(
            [*M2D, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )

    first = m2d("launch", "--cluster", "local", "--stage", "pretrain", "--name", "vp", *flags)
    assert first.returncode == 2, first.stdout + first.stderr
    errors = [line for line in first.stderr.splitlines() if line.startswith("error")]
    assert errors == [
        f"error: {prompts}: prompts file not found; check the path; once fixed, "
        "`m2d launch --resume vp` starts the run"
    ]
    prompts.write_text('{"id": "v0", "prompts": ["a red cube", "a blue ball"]}\n')
    resumed = m2d("launch", "--resume", "vp")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.splitlines()[-1].startswith("run vp finished: step 2/2")


def test_export_from_s3_loads_in_stock_diffusers(s3_pretrain, tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    from trainer.export import export_checkpoint

    run = s3_pretrain["run"]
    uri = f"s3://{s3_pretrain['bucket']}/runs/pre-z2/checkpoint_00000006"
    export_checkpoint(uri, tmp_path / "export", run.storage)
    assert (tmp_path / "export" / "diffusion_pytorch_model.safetensors").is_file()
    stock = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "export").state_dict()
    trained = module_weights(s3_pretrain["local"] / "checkpoint_00000006")
    assert {f"transformer.{k}" for k in stock} == set(trained)
    for key, value in stock.items():
        assert torch.equal(value, trained[f"transformer.{key}"]), key

    # To S3 as the CLI runs it: uploaded (not a local folder named "s3:"), loadable from
    # there, and never over an export that is there already.
    fs, target = s3_pretrain["fs"], f"s3://{s3_pretrain['bucket']}/exports/pre-z2"
    spec = ExportSpec(checkpoint=uri, out=target, storage=run.storage)
    command = [sys.executable, "-m", "trainer.export", *spec_argv(spec)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "s3:").exists()
    fs.get(f"{target}/", str(tmp_path / "downloaded"), recursive=True)
    downloaded = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "downloaded")
    for key, value in downloaded.state_dict().items():
        assert torch.equal(value, stock[key]), key
    before = {path: fs.info(path)["ETag"] for path in fs.find(target)}
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and f"{target} is not empty" in again.stderr
    assert "Traceback" not in again.stderr
    assert {path: fs.info(path)["ETag"] for path in fs.find(target)} == before


def test_worker_side_user_error_exits_2_with_its_message(tmp_path, mlflow_server):
    (tmp_path / "runs" / "bad-data").mkdir(parents=True)
    config = tmp_path / "runs" / "bad-data" / "run_config.json"
    # The manifest exists (the driver checks that much) but only a worker reads its rows.
    columns = tmp_path / "columns.jsonl"
    columns.write_text('{"video": "a.mp4"}\n')
    run = make_run({"root": str(tmp_path / "runs")}, mlflow_server, data__pretrain=str(columns))
    config.write_text(run.model_dump_json())
    done = run_job(str(config))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("run bad-data failed: step 0/")
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: DataError: {columns}: missing required column(s) "), last


def test_a_kill_during_a_checkpoint_upload_leaves_it_incomplete_and_unused(
    s3_endpoint, mlflow_server, synth_data, tmp_path
):
    """The job SIGKILLed while rank 1 uploads the last checkpoint to the S3 server (the
    proxy holds those requests): that checkpoint has rank 0's files but no manifest, so
    `m2d checkpoints` calls it incomplete and readers take the one before; the resumed run
    continues from that one, and keeps two checkpoints although keep_checkpoints is 1."""
    import signal

    import boto3
    import s3fs
    from ray_session import ray_session, wait_gone

    from orchestrator.runs import latest_checkpoint

    bucket = f"m2d-torn-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    run_dir = f"s3://{bucket}/runs/torn"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    last = f"{bucket}/runs/torn/checkpoint_{STEPS:08d}"
    with CountingProxy(s3_endpoint) as proxy:
        proxy.holds = lambda key: key.startswith(f"{last}/") and "rank_1" in key
        storage = {"root": f"s3://{bucket}/runs", "endpoint_url": proxy.url}
        run = make_run(
            storage,
            mlflow_server,
            data__pretrain=str(synth_data / "pretrain.jsonl"),
            fault_tolerance__keep_checkpoints=1,
        )
        fs.pipe(f"{bucket}/runs/torn/run_config.json", run.model_dump_json().encode())
        spec = TrainJobSpec(config=f"{run_dir}/run_config.json", storage=run.storage)
        env = local_env()
        job = _start([sys.executable, "-m", "trainer.job", *spec_argv(spec)], env)
        try:
            assert proxy.held.wait(timeout=600), "rank 1 never uploaded the last checkpoint"
            # The controller commits the checkpoint before (it reports asynchronously):
            # with rank 1 held, the job can go no further than that.
            first = f"{bucket}/runs/torn/checkpoint_{EVERY:08d}/manifest.json"
            deadline = time.monotonic() + 120
            while not fs.exists(first):
                assert time.monotonic() < deadline, "the first checkpoint got no manifest"
                time.sleep(0.2)
                fs.invalidate_cache()
            session = ray_session(psutil.Process(job.pid))
            os.killpg(job.pid, signal.SIGKILL)
            for process in session:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            wait_gone(session)
        finally:
            if job.poll() is None:
                job.kill()
            job.wait()
    fs.invalidate_cache()
    torn = fs.find(last)
    assert any("rank_0" in key for key in torn), torn  # rank 0's part did land
    assert not any(key.endswith("manifest.json") for key in torn)

    storage = {"root": f"s3://{bucket}/runs", "endpoint_url": s3_endpoint}
    record = register_run("torn", run_dir, storage=storage)
    listed = subprocess.run(
        [*M2D_CLI, "checkpoints", "torn"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()[1:]  # below the header
    assert lines[0].startswith(f"checkpoint_{EVERY:08d}  complete")
    torn = (  # the proxy held rank 1's upload: its list never came
        "no manifest.json (the save did not finish): rank 1's file list "
        "ranks/files_rank_1.json is missing"
    )
    assert lines[1] == f"checkpoint_{STEPS:08d}  incomplete  {torn}"
    warnings: list[str] = []
    before = f"{run_dir}/checkpoint_{EVERY:08d}"
    assert latest_checkpoint(record, warnings.append) == before
    assert warnings == [
        f"checkpoint {run_dir}/checkpoint_{STEPS:08d} is incomplete ({torn}); using {before}"
    ]

    direct = run.model_copy(update={"storage": StorageConfig(**record.storage)})
    fs.pipe(f"{bucket}/runs/torn/run_config.json", direct.model_dump_json().encode())
    done = run_job(f"{run_dir}/run_config.json", endpoint_url=s3_endpoint)  # no proxy now
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"rank 0 resumed at step {EVERY}" in done.stdout + done.stderr
    warnings.clear()
    latest = latest_checkpoint(record, warnings.append)
    assert latest == f"{run_dir}/checkpoint_{STEPS:08d}" and not warnings, warnings
    fs.invalidate_cache()
    kept = sorted(
        name for p in fs.ls(f"{bucket}/runs/torn") if (name := p.rsplit("/", 1)[-1])[11:].isdigit()
    )
    assert kept == [f"checkpoint_{EVERY:08d}", f"checkpoint_{STEPS:08d}"]  # 2, not 1
    verified = subprocess.run(
        [*M2D_CLI, "checkpoints", "torn", "--verify"], cwd=ROOT, capture_output=True, text=True
    )
    assert [line.split()[1] for line in verified.stdout.splitlines()[1:]] == ["verified"] * 2


def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
