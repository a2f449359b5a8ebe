"""The training job for real: Ray Train, 2 CPU workers, DeepSpeed ZeRO, S3 and MLflow servers.

Small on purpose (tiny model, 3 scenes x 9 frames at 32x32, 6 steps): each run costs
about a minute of Ray and DeepSpeed start-up on a 2-core machine. Six steps because
DeepSpeed's WarmupLR gives lr 0 to the first two; the resume test stops after step 3,
once the weights have really moved.
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
from typing import Any

import psutil
import pytest
import safetensors.torch
import torch
import yaml
from m2d_cli import M2D as M2D_CLI
from m2d_cli import register_run
from s3_proxy import CountingProxy
from tiny_models import tiny_clip

from infra.checkpoint_layout import WEIGHTS
from infra.config import ClusterProfile, RunConfig, StorageConfig, resolve_run
from infra.job_specs import ExportSpec, SynthSpec, TrainJobSpec
from infra.jobs import spec_argv
from trainer.checkpointing import _owner

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
EVERY = 3
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


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    """Real mp4 stories and both manifests from the data package's generator."""
    out = tmp_path_factory.mktemp("data")
    spec = SynthSpec(out=str(out), stories=4, scenes=3, frames=17, height=32, width=32, seed=0)
    subprocess.run(
        [sys.executable, "-m", "trainer.data.synth", *spec_argv(spec)], check=True, cwd=ROOT
    )
    return out


def make_run(storage: dict, tracking_uri: str, stage: str = "pretrain", **changes) -> RunConfig:
    """The `local` profile's run for ``stage``, shrunk to STEPS steps."""
    profile = ClusterProfile.model_validate(
        yaml.safe_load((ROOT / "clusters/local.yaml").read_text())
    )
    overrides = {
        "recipe": {"steps": STEPS, "warmup_steps": 1},
        "fault_tolerance": {"checkpoint_every": EVERY, "keep_checkpoints": 2, "max_failures": 0},
        "storage": storage,
        "tracking": {"uri": tracking_uri, "experiment": "m2d-it"},
    }
    for key, value in changes.items():
        section, name = key.split("__")
        overrides.setdefault(section, {})[name] = value
    return resolve_run(profile, "local", stage, overrides)


def run_job(config_uri: str, endpoint_url: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    storage = StorageConfig(root=config_uri, endpoint_url=endpoint_url) if endpoint_url else None
    spec = TrainJobSpec(config=config_uri, storage=storage)
    return subprocess.run(
        [sys.executable, "-m", "trainer.job", *spec_argv(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def module_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    states = torch.load(checkpoint / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)
    return states["module"]


def whole_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The transformer's weights file of a checkpoint (whole under ZeRO-3 too)."""
    return safetensors.torch.load_file(checkpoint / WEIGHTS)


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="module")
def s3_pretrain(s3_endpoint, mlflow_server, synth_data, tmp_path_factory):
    """A ZeRO-2 pretrain run of STEPS steps through `python -m trainer.job`, stored in S3."""
    import boto3
    import s3fs

    bucket = f"m2d-train-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    storage = {"root": f"s3://{bucket}/runs", "endpoint_url": s3_endpoint}
    run = make_run(storage, mlflow_server, data__pretrain=str(synth_data / "pretrain.jsonl"))
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.pipe(f"{bucket}/runs/pre-z2/run_config.json", run.model_dump_json().encode())
    done = run_job(f"s3://{bucket}/runs/pre-z2/run_config.json", endpoint_url=s3_endpoint)
    assert done.returncode == 0, done.stderr[-3000:]
    local = tmp_path_factory.mktemp("s3copy")
    fs.get(f"{bucket}/runs/pre-z2/", str(local), recursive=True)
    return {"stdout": done.stdout, "fs": fs, "bucket": bucket, "local": local, "run": run}


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


def test_resume_equals_uninterrupted_run(s3_pretrain, mlflow_server, synth_data, tmp_path):
    """EVERY steps, stop, resume to STEPS == the uninterrupted STEPS-step run (S3 one)."""
    from trainer.job import fit, read_run_folder

    folder_path = tmp_path / "runs" / "pre-resume"
    folder_path.mkdir(parents=True)
    config = folder_path / "run_config.json"
    data = str(synth_data / "pretrain.jsonl")
    storage = {"root": str(tmp_path / "runs")}
    for steps in (EVERY, STEPS):
        run = make_run(storage, mlflow_server, recipe__steps=steps, data__pretrain=data)
        config.write_text(run.model_dump_json())
        outcome = fit(read_run_folder(str(config)))
        assert outcome.error is None
    resumed = module_weights(folder_path / "checkpoint_00000006")
    reference = module_weights(s3_pretrain["local"] / "checkpoint_00000006")
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    stopped = module_weights(folder_path / f"checkpoint_{EVERY:08d}")
    assert any(not torch.equal(stopped[k], reference[k]) for k in reference)  # it trained on
    # One MLflow run across the stop, each step logged once.
    history = mlflow_client(mlflow_server).get_metric_history(outcome.tracker.run_id, "loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))


def _loss_history(tracking_uri: str, run_id: str) -> list[tuple[int, float]]:
    history = mlflow_client(tracking_uri).get_metric_history(run_id, "loss")
    return [(m.step, m.value) for m in history]


def _assert_continues_like(resumed: Path, reference: Path, losses, reference_losses) -> None:
    """The resharded run ends where the uninterrupted one does, up to the order in which
    floating-point sums are taken (an all-reduce over ranks vs accumulated micro-batches),
    far closer than what the three steps after the stop moved the weights: it trained the
    same stories with the same noise - a story repeated or skipped would move them apart."""
    ours, theirs = whole_weights(resumed), whole_weights(reference)
    stopped = whole_weights(reference.parent / f"checkpoint_{EVERY:08d}")
    moved = max((theirs[k] - stopped[k]).abs().max().item() for k in theirs)
    apart = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    print(f"weights apart {apart:.3g}, moved {moved:.3g}")
    assert apart < 1e-4 * moved, (apart, moved)
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))  # each step once
    values = [loss for _, loss in losses]
    assert values == pytest.approx([loss for _, loss in reference_losses], rel=1e-4)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_resume_on_one_worker_of_a_two_worker_run(
    s3_pretrain, mlflow_server, synth_data, tmp_path, zero_stage
):
    """`m2d launch --resume RUN --set workers.num_workers=1` after a stop at step 3 of a
    2-worker run: the launcher keeps the global batch (2 micro-batches a step now), the
    job converts the checkpoint to DeepSpeed's universal form and goes on with the stories
    the two workers would have taken, to the uninterrupted ZeRO-2 run's weights and losses
    (ZeRO-3 too: the same sums, partitioned otherwise)."""
    from trainer.job import fit, read_run_folder

    folder = tmp_path / "runs" / "resharded"
    folder.mkdir(parents=True)
    data = str(synth_data / "pretrain.jsonl")
    storage = {"root": str(tmp_path / "runs")}
    stage = {"deepspeed__zero_stage": zero_stage, "data__pretrain": data}
    first = make_run(storage, mlflow_server, recipe__steps=EVERY, **stage)
    (folder / "run_config.json").write_text(first.model_dump_json())
    assert fit(read_run_folder(str(folder / "run_config.json"))).error is None
    run = make_run(storage, mlflow_server, **stage)
    (folder / "run_config.json").write_text(run.model_dump_json())
    register_run("resharded", str(folder), tracking_uri=mlflow_server, experiment="m2d-it")

    done = subprocess.run(
        [*M2D_CLI, "launch", "--resume", "resharded", "--set", "workers.num_workers=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "now 1 worker(s) on 1 node(s), 1 x 2 micro-batch(es)" in done.stdout
    resized = RunConfig.model_validate_json((folder / "run_config.json").read_text())
    assert (resized.workers.num_workers, resized.deepspeed.gradient_accumulation) == (1, 2)
    assert [
        RunConfig.model_validate_json(p.read_text()) for p in folder.glob("run_config.*.json")
    ] == [run]  # the config it replaced is kept
    final = folder / f"checkpoint_{STEPS:08d}"
    assert json.loads((final / "trainer_state.json").read_text())["world_size"] == 1
    assert not any("rank_1" in p.name for p in (final / "deepspeed").iterdir())
    # 5 stories an epoch: 2 workers take 4 in 2 steps (one left out); resharded after
    # step 3, one worker ends epoch 1 at step 4 and takes 4 of epoch 2's 5 in steps 5-6.
    position = torch.load(final / "ranks" / "rank_0.pt", weights_only=False)["data"]
    order = position["loader"]["order"]
    assert (order["epoch"], order["position"], order["world_size"]) == (2, 4, 1)
    run_id = json.loads((final / "trainer_state.json").read_text())["mlflow_run_id"]
    reference = s3_pretrain["local"] / f"checkpoint_{STEPS:08d}"
    reference_id = json.loads((reference / "trainer_state.json").read_text())["mlflow_run_id"]
    _assert_continues_like(
        final,
        reference,
        _loss_history(mlflow_server, run_id),
        _loss_history(mlflow_server, reference_id),
    )


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_resume_on_two_workers_of_a_one_worker_run_in_s3(
    s3_pretrain, s3_endpoint, mlflow_server, synth_data, tmp_path, zero_stage
):
    """The other way, stored in S3: one worker (2 micro-batches a step) stops at step 3,
    two workers go on - the node takes every rank's files once to convert them - and end
    where one worker going on would have, validating on the way (under ZeRO-3 every rank
    renders, its parameters gathered as in training)."""
    from trainer.job import fit, read_run_folder

    fs, bucket = s3_pretrain["fs"], s3_pretrain["bucket"]
    storage = StorageConfig(root=f"s3://{bucket}/runs", endpoint_url=s3_endpoint)
    one = {"workers__num_workers": 1, "deepspeed__gradient_accumulation": 2}

    def train(name: str, steps: int, **sizes) -> Any:
        run = make_run(
            storage.model_dump(),
            mlflow_server,
            recipe__steps=steps,
            data__pretrain=str(synth_data / "pretrain.jsonl"),
            deepspeed__zero_stage=zero_stage,
            **sizes,
        )
        config = f"{bucket}/runs/{name}/run_config.json"
        fs.pipe(config, run.model_dump_json().encode())
        outcome = fit(read_run_folder(f"s3://{config}", storage))
        assert outcome.error is None
        return outcome.tracker.run_id

    one_name, grown = f"z{zero_stage}-one", f"z{zero_stage}-grown"
    reference_id = train(one_name, STEPS, **one)
    # The resized run also validates (every rank renders under ZeRO-3, as it trains):
    # its weights must still be the reference's, which does not.
    validation = {"every": 2, "stories": 1, "seeds": [0, 1], "sampling_steps": 2}
    train(grown, EVERY, recipe__validation=validation, **one)
    run_id = train(grown, STEPS, recipe__validation=validation)
    for name in (one_name, grown):
        for step in (EVERY, STEPS):
            checkpoint = f"{bucket}/runs/{name}/checkpoint_{step:08d}"
            for part in (WEIGHTS, "trainer_state.json"):
                fs.get(
                    f"{checkpoint}/{part}", str(tmp_path / name / checkpoint.rsplit("/")[-1] / part)
                )
    final = tmp_path / grown / f"checkpoint_{STEPS:08d}"
    assert json.loads((final / "trainer_state.json").read_text())["world_size"] == 2
    validated = mlflow_client(mlflow_server).get_metric_history(run_id, "validation_s")
    assert [m.step for m in validated] == [2, 4, 6]
    _assert_continues_like(
        final,
        tmp_path / one_name / f"checkpoint_{STEPS:08d}",
        _loss_history(mlflow_server, run_id),
        _loss_history(mlflow_server, reference_id),
    )


def test_validation_renders_from_the_training_weights_into_the_run_at_its_steps(
    s3_pretrain, mlflow_server, synth_data, tmp_path
):
    """Validation every 2 steps (2 renders: one story, two seeds, a tiny CLIP scoring
    them), the run stopped at step 3 and resumed: the training run holds a contact sheet
    per render and the scores and cost at steps 2, 4 and 6, each once, the GIFs beside;
    and the weights are the uninterrupted run's without validation, bit for bit (renders
    draw from their own generators, with the engine's own module)."""
    from trainer.job import fit, read_run_folder

    encoder = tiny_clip(tmp_path / "clip")
    folder = tmp_path / "runs" / "validated"
    folder.mkdir(parents=True)
    config = folder / "run_config.json"
    validation = {
        "every": 2,
        "stories": 1,
        "seeds": [0, 1],
        "sampling_steps": 2,
        "encoder": "clip",
        "encoder_path": str(encoder),
    }
    for steps in (EVERY, STEPS):
        run = make_run(
            {"root": str(tmp_path / "runs")},
            mlflow_server,
            recipe__steps=steps,
            recipe__validation=validation,
            data__pretrain=str(synth_data / "pretrain.jsonl"),
        )
        config.write_text(run.model_dump_json())
        outcome = fit(read_run_folder(str(config)))
        assert outcome.error is None
    client, run_id = mlflow_client(mlflow_server), outcome.tracker.run_id
    steps = [2, 4, 6]
    for key in ("validation_s", "validation_overhead", "val_visual", "val_semantic"):
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == steps, key
    visual = client.get_metric_history(run_id, "val_visual")
    assert all(-100 <= m.value <= 100 for m in visual)
    story = "story_01"
    images = outcome.tracker.logged_images()
    wanted = {(f"validation/{story}/seed{seed}", step): 1 for seed in (0, 1) for step in steps}
    assert {k: v for k, v in images.items() if k[0].startswith("validation/")} == wanted
    for step in steps:
        listed = client.list_artifacts(run_id, f"validation/step_{step:08d}")
        assert sorted(a.path.rsplit("/", 1)[-1] for a in listed) == [
            f"{story}_seed0.gif",
            f"{story}_seed0.png",
            f"{story}_seed1.gif",
            f"{story}_seed1.png",
        ]
    ours = whole_weights(folder / f"checkpoint_{STEPS:08d}")
    theirs = whole_weights(s3_pretrain["local"] / f"checkpoint_{STEPS:08d}")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_resume_from_s3_reads_each_file_once_per_node_and_only_own_shards(
    s3_pretrain, mlflow_server, synth_data, s3_endpoint, tmp_path
):
    """A resume from the object store: the shared files once per node, each rank its own
    optimizer shard and position, never another rank's nor the weights file (Ray's
    ``as_directory`` copied all of them to every node) - and it resumes exactly."""
    fs, bucket = s3_pretrain["fs"], s3_pretrain["bucket"]
    config = f"{bucket}/runs/pre-resume-s3/run_config.json"
    with CountingProxy(s3_endpoint) as proxy:
        storage = {"root": f"s3://{bucket}/runs", "endpoint_url": proxy.url}
        data = str(synth_data / "pretrain.jsonl")
        for steps in (EVERY, STEPS):
            run = make_run(storage, mlflow_server, recipe__steps=steps, data__pretrain=data)
            fs.pipe(config, run.model_dump_json().encode())
            proxy.clear()
            done = run_job(f"s3://{config}", endpoint_url=proxy.url)
            assert done.returncode == 0, done.stderr[-3000:]
        checkpoint = f"{bucket}/runs/pre-resume-s3/checkpoint_{EVERY:08d}"
        reads = [(pid, key) for pid, key in proxy.reads if key.startswith(checkpoint)]
    files = set(fs.find(checkpoint))
    read = [key for _, key in reads]
    assert sorted(read) == sorted(f for f in files if "/weights/" not in f), read  # each once
    by_pid: dict[int, set[str]] = {}
    for pid, key in reads:
        by_pid.setdefault(pid, set()).add(key.removeprefix(f"{checkpoint}/"))
    own = {pid: {_owner(k) for k in keys} - {None} for pid, keys in by_pid.items()}
    assert sorted(own.values(), key=sorted) == [{0}, {1}], by_pid
    final = f"{bucket}/runs/pre-resume-s3/checkpoint_{STEPS:08d}/deepspeed"
    fs.get(f"{final}/mp_rank_00_model_states.pt", str(tmp_path / "deepspeed") + "/")
    resumed = module_weights(tmp_path)
    reference = module_weights(s3_pretrain["local"] / f"checkpoint_{STEPS:08d}")
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


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
    assert tags["mlflow.parentRunId"] == pretrain_state["mlflow_run_id"]  # nested in MLflow
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
    from infra.checkpoint_layout import (
        RUN_CONFIG,
        TRAINER_STATE,
        WEIGHTS,
        consolidated_state_dict,
        read_weights,
    )
    from infra.sample_spec import CheckpointSpec, SampleJobSpec
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
        # Besides it, only the driver's look at the source run (its MLflow run id).
        small = {f"{checkpoint}/{name}" for name in (WEIGHTS, TRAINER_STATE, RUN_CONFIG)}
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
    assert "no run config there" in done.stderr


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
        "without files)"
    )


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
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
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
    lines = listed.stdout.splitlines()
    assert lines[0].startswith(f"checkpoint_{EVERY:08d}  complete")
    assert lines[1] == (
        f"checkpoint_{STEPS:08d}  incomplete  no manifest.json (the save did not finish)"
    )
    warnings: list[str] = []
    before = f"{run_dir}/checkpoint_{EVERY:08d}"
    assert latest_checkpoint(record, warnings.append) == before
    assert warnings == [
        f"checkpoint {run_dir}/checkpoint_{STEPS:08d} is incomplete (no manifest.json (the "
        f"save did not finish)); using {before}"
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
    assert [line.split()[1] for line in verified.stdout.splitlines()] == ["verified"] * 2


def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
