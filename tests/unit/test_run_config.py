"""Resolving a run: recipes, --set overrides, the DeepSpeed JSON, and --dry-run output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from infra.config import RunConfig
from infra.deepspeed_config import deepspeed_config
from orchestrator import profiles
from orchestrator.cli import cli

CLUSTERS = Path(__file__).resolve().parents[2] / "clusters"


def _run(cluster: str, stage: str, *assignments: str):
    loaded = profiles.load_profile(CLUSTERS / f"{cluster}.yaml")
    return profiles.resolve(loaded, stage, profiles.parse_overrides(list(assignments)))


def test_set_overrides_typed_values():
    run = _run(
        "a100x8",
        "sft",
        "recipe.steps=123",
        "recipe.betas=[0.8, 0.95]",
        "deepspeed.zero_stage=3",
        "deepspeed.offload_param=cpu",
        "runtime_env.env_vars.NCCL_DEBUG=INFO",
    )
    assert run.recipe.steps == 123 and run.recipe.betas == (0.8, 0.95)
    assert run.deepspeed.zero_stage == 3 and run.deepspeed.offload_param == "cpu"
    assert run.runtime_env.env_vars == {"HF_HUB_OFFLINE": "1", "NCCL_DEBUG": "INFO"}
    assert run.recipe.extension_prob == 0.5  # the sft default survives


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("recipe.stpes=5", "recipe has no key 'stpes'; did you mean 'steps'?"),
        ("deepspeed.zero_stag=3", "did you mean 'zero_stage'?"),
        ("recipes.steps=5", "the run config has no key 'recipes'; did you mean 'recipe'?"),
        ("recipe.steps", "expected KEY.PATH=VALUE"),
    ],
)
def test_set_refuses_unknown_keys(assignment, message):
    result = CliRunner().invoke(
        cli, ["launch", "--cluster", "local", "--stage", "sft", "--set", assignment, "--dry-run"]
    )
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_set_value_errors_name_the_override():
    result = CliRunner().invoke(
        cli,
        ["launch", "--cluster", "local", "--stage", "sft", "--set", "recipe.global_batch=3"],
    )
    assert result.exit_code == 2
    assert "--set: recipe.global_batch: global batch 3 != micro_batch_per_gpu 1" in result.output


def _deepspeed_parse(config: dict, world_size: int, monkeypatch):
    """DeepSpeed's own config parser, with the world size the run would have."""
    from deepspeed.runtime import config as ds_config_module

    monkeypatch.setattr(ds_config_module.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(ds_config_module.dist, "get_world_size", lambda *a: world_size)
    return ds_config_module.DeepSpeedConfig(config)


@pytest.mark.parametrize(
    ("cluster", "assignments"),
    [
        ("local", ()),
        ("a100x8", ()),
        ("a100x64", ("deepspeed.gradient_accumulation=2", "recipe.global_batch=128")),
        ("a100x8", ("deepspeed.zero_stage=3", "deepspeed.offload_param=cpu")),
        ("a100x8", ("deepspeed.precision=fp16", "deepspeed.offload_optimizer=cpu")),
    ],
)
def test_deepspeed_accepts_the_derived_config(cluster, assignments, monkeypatch):
    run = _run(cluster, "pretrain", *assignments)
    parsed = _deepspeed_parse(deepspeed_config(run), run.workers.num_workers, monkeypatch)
    ds = run.deepspeed
    assert parsed.train_batch_size == run.recipe.global_batch
    assert parsed.gradient_accumulation_steps == ds.gradient_accumulation
    assert parsed.train_micro_batch_size_per_gpu == ds.micro_batch_per_gpu
    assert parsed.zero_optimization_stage == ds.zero_stage
    assert parsed.bfloat16_config.enabled == (ds.precision == "bf16")
    assert parsed.float16_config.enabled == (ds.precision == "fp16")
    assert parsed.gradient_clipping == run.recipe.gradient_clipping
    assert parsed.optimizer_params["lr"] == run.recipe.learning_rate
    offload = parsed.zero_config.offload_param
    assert (offload is not None and offload.device == "cpu") == (ds.offload_param == "cpu")


def test_dry_run_prints_config_and_deepspeed_json_without_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t0ken-value")
    result = CliRunner().invoke(
        cli, ["launch", "--cluster", "a100x64", "--stage", "pretrain", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "s3cr3t-value" not in result.output and "t0ken-value" not in result.output
    assert "AWS_SECRET_ACCESS_KEY: set" in result.output
    assert "cluster: a100x64" in result.output and "stage: pretrain" in result.output
    ds_json = json.loads(result.output.split("# DeepSpeed config\n", 1)[1].split("# Plan")[0])
    assert ds_json["train_batch_size"] == 64 and ds_json["bf16"]["enabled"] is True


def test_schedule_and_optimizer_follow_the_recipe():
    no_warmup = deepspeed_config(_run("local", "pretrain", "recipe.warmup_steps=0"))
    params = no_warmup["scheduler"]["params"]
    assert params["warmup_min_lr"] == params["warmup_max_lr"] == 1e-3  # constant from step 0
    assert params["warmup_num_steps"] == 1
    warm = deepspeed_config(_run("a100x8", "pretrain"))["scheduler"]["params"]
    assert (warm["warmup_min_lr"], warm["warmup_num_steps"]) == (0.0, 100)
    # CPU workers get torch's AdamW (bit-exact across resume); GPU workers DeepSpeed's.
    assert no_warmup["optimizer"]["params"]["torch_adam"] is True
    assert "torch_adam" not in deepspeed_config(_run("a100x8", "sft"))["optimizer"]["params"]


def test_the_run_folder_is_all_the_workers_get(tmp_path):
    """What the launcher writes into a run folder is exactly what every worker trains
    with: no flag or side channel adds to it."""
    from orchestrator import runs
    from trainer.job import read_run_folder, worker_config

    loaded = profiles.load_profile(CLUSTERS / "local.yaml")
    overrides = {
        "storage": {"root": str(tmp_path / "runs")},
        "data": {"sft": str(tmp_path / "sft.jsonl"), "synthetic": True},
        "recipe": {"steps": 7, "warmup_steps": 1},
    }
    run = runs.with_absolute_paths(profiles.resolve(loaded, "sft", overrides))
    run = run.model_copy(update={"init_from": str(tmp_path / "pre" / "checkpoint_00000004")})
    uri = runs.create_run_folder(run, "r1")
    config = worker_config(read_run_folder(uri), "mlflow-id")
    assert set(config) == {"run", "mlflow_run_id"} and config["mlflow_run_id"] == "mlflow-id"
    # As Ray hands it over (JSON-able), and as the worker reads it.
    seen = RunConfig.model_validate(json.loads(json.dumps(config))["run"])
    assert seen == run
    assert seen.init_from == run.init_from and seen.data.synthetic and seen.recipe.steps == 7


def test_validation_is_off_by_default_and_set_per_stage():
    assert _run("local", "pretrain").recipe.validation.every == 0
    run = _run(
        "local",
        "sft",
        "recipe.validation.every=50",
        "recipe.validation.seeds=[1, 2]",
        "recipe.validation.encoder=clip",
        "recipe.validation.encoder_path=tiny",
    )
    validation = run.recipe.validation
    assert (validation.every, validation.seeds, validation.prompts) == (50, (1, 2), "eval50")
    result = CliRunner().invoke(
        cli,
        [
            "launch", "--cluster", "local", "--stage", "sft", "--dry-run",
            "--set", "recipe.validation.encoder=clip",
        ],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "recipe.validation.encoder_path: encoder clip needs its folder" in result.output


CREDENTIAL_URLS = {
    "ray.address": "http://admin:hunter2@head:8265",
    "storage.root": "s3://key:hunter2@bucket/runs",
    "storage.endpoint_url": "http://key:hunter2@127.0.0.1:9000",
    "tracking.uri": "https://hunter2@mlflow.example",  # a token as the user part
    "model.source": "s3://key:hunter2@bucket/CogVideoX-5b",
    "data.pretrain": "s3://key:hunter2@bucket/pretrain.jsonl",
    "data.sft_latents": "s3://hunter2@bucket/latents",
    "runtime_env.pip": '["--index-url https://user:hunter2@pypi.example/simple"]',
    "runtime_env.image": "registry.example/m2d@sha256:abc",  # a digest is no userinfo
}


@pytest.mark.parametrize("key", sorted(CREDENTIAL_URLS))
def test_a_url_with_credentials_is_refused_without_echoing_them(key):
    result = CliRunner().invoke(
        cli,
        ["launch", "--cluster", "local", "--stage", "pretrain", "--dry-run", "--set",
         f"{key}={CREDENTIAL_URLS[key]}"],
    )  # fmt: skip
    if key == "runtime_env.image":
        assert "must not contain" not in result.output, result.output
        return
    assert result.exit_code == 2, result.output
    assert f"{key}: must not contain a password or any user@ in a URL" in result.output
    assert "hunter2" not in result.output


@pytest.mark.parametrize(
    "uri", ["http://127.0.0.1:9000", "s3://bucket/a@b/runs", "sqlite:///runs/m@lflow.db"]
)
def test_an_at_sign_outside_a_urls_authority_is_no_credential(uri):
    from infra.config import StorageConfig

    assert StorageConfig(root="./runs", endpoint_url=uri).endpoint_url == uri
