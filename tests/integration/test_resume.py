"""Resuming a training run for real: from its last checkpoint, on another number of
workers, and from S3 - each ending where the uninterrupted run (``s3_pretrain``) does."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
import torch
from m2d_cli import M2D as M2D_CLI
from m2d_cli import register_run
from s3_proxy import CountingProxy
from training_runs import (
    EVERY,
    ROOT,
    STEPS,
    assert_continues_like,
    loss_history,
    make_run,
    mlflow_client,
    module_weights,
    run_job,
)

from infra.checkpoint_layout import WEIGHTS
from infra.config import RunConfig, StorageConfig
from trainer.checkpointing import _owner

pytestmark = pytest.mark.integration


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
    assert_continues_like(
        final,
        reference,
        loss_history(mlflow_server, run_id),
        loss_history(mlflow_server, reference_id),
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
    assert_continues_like(
        final,
        tmp_path / one_name / f"checkpoint_{STEPS:08d}",
        loss_history(mlflow_server, run_id),
        loss_history(mlflow_server, reference_id),
    )


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
