"""`m2d plan`: parameter shapes against stock diffusers/transformers models built on the
`meta` device, memory against CogVideoX's published fine-tuning table, the CLI's table,
JSON and refusals. The planner's bytes against what DeepSpeed allocates, and its
activations against what Mask²DiT saves for backward, are in
tests/integration/test_plan_measured.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from infra.config import ClusterProfile, resolve_run
from orchestrator.cli import cli
from orchestrator.plan.estimate import GIB, ModelConfigs, plan_run, plan_with_suggestion
from orchestrator.plan.shapes import numel, t5_encoder_shapes, transformer_shapes, vae_shapes
from orchestrator.plan.sources import read_model_configs

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "orchestrator" / "plan" / "model_configs"
JSON_KEYS = {
    "per_gpu_peak_gib",
    "fits",
    "breakdown_gib",
    "tokens_per_sample",
    "step_seconds",
    "stage_gpu_hours",
    "cost_usd",
}
BREAKDOWN = {"params", "grads", "optimizer", "activations", "frozen", "buffers", "overhead"}


def _configs(name: str) -> ModelConfigs:
    return ModelConfigs(
        **{p: json.loads((MODELS / name / p / "config.json").read_text()) for p in _PARTS}
    )


_PARTS = ("transformer", "text_encoder", "vae")


def _meta_shapes(configs: ModelConfigs) -> dict[str, dict]:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        models = {
            "transformer": CogVideoXTransformer3DModel.from_config(configs.transformer),
            "vae": AutoencoderKLCogVideoX.from_config(configs.vae),
            "text_encoder": T5EncoderModel(T5Config(**configs.text_encoder)),
        }
    return {
        part: {name: tuple(p.shape) for name, p in model.named_parameters()}
        for part, model in models.items()
    }


def _planned_shapes(configs: ModelConfigs) -> dict[str, dict]:
    return {
        "transformer": transformer_shapes(configs.transformer),
        "vae": vae_shapes(configs.vae),
        "text_encoder": t5_encoder_shapes(configs.text_encoder),
    }


@pytest.mark.parametrize("name", ["CogVideoX-2b", "CogVideoX-5b"])
def test_parameter_shapes_equal_the_stock_models_on_meta(name):
    configs = _configs(name)
    assert _planned_shapes(configs) == _meta_shapes(configs)


def test_the_published_parameter_counts():
    # CogVideoX's model cards: 2B and 5B transformers; T5-v1.1-XXL's encoder is 4.76B.
    billions = {
        name: round(numel(transformer_shapes(_configs(name).transformer)) / 1e9, 2)
        for name in ("CogVideoX-2b", "CogVideoX-5b")
    }
    assert billions == {"CogVideoX-2b": 1.69, "CogVideoX-5b": 5.57}
    assert round(numel(t5_encoder_shapes(_configs("CogVideoX-5b").text_encoder)) / 1e9, 2) == 4.76


def test_tiny_configs_are_the_tiny_model_m2d_builds():
    from transformers import ByT5Tokenizer

    from infra.config import ModelConfig
    from mask2dit.components import tiny_parts
    from mask2dit.tiny import BYT5_VOCAB_SIZE
    from orchestrator.plan.sources import read_model_configs as read

    assert len(ByT5Tokenizer()) == BYT5_VOCAB_SIZE  # the tokenizer the tiny T5 is built for
    parts = tiny_parts()
    planned = _planned_shapes(read(ModelConfig(source="tiny"), None))
    built = {
        part: {name: tuple(p.shape) for name, p in getattr(parts, part).named_parameters()}
        for part in _PARTS
    }
    assert planned == built


def _profile(**changes) -> ClusterProfile:
    """A GPU profile for the published comparisons: 8 x A100-80G, one scene."""
    data = yaml.safe_load((ROOT / "clusters" / "a100x8.yaml").read_text())
    data["stages"] = {
        "sft": {"num_scenes": 1, "extension_prob": 0.0, "frames": 49, "height": 480, "width": 720}
    }
    data["data"] = {"sft_latents": "/mnt/latents/sft"}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data.setdefault(section, {})[key] = value
    return ClusterProfile.model_validate(data)


# CogVideo repository, finetune/README.md ("Hardware Requirements"), SFT at 49x480x720
# on 8 GPUs with ZeRO-2: CogVideoX-2B fp16 17 GB, CogVideoX-5B bf16 42 GB. Their trainer
# caches latents and prompt embeddings before training and unloads the VAE and T5
# (finetune/trainer.py), checkpoints activations, and uses reduce_bucket_size 5e8 with
# overlap_comm and contiguous_gradients (finetune/configs/zero2.yaml) - as m2d's GPU
# config does.
@pytest.mark.parametrize(
    "name, precision, published_gb", [("CogVideoX-2b", "fp16", 17), ("CogVideoX-5b", "bf16", 42)]
)
def test_memory_within_25_percent_of_cogvideox_published_finetuning(name, precision, published_gb):
    profile = _profile(deepspeed__precision=precision, model__source=str(MODELS / name))
    run = resolve_run(profile, "a100x8", "sft")
    plan = plan_run(run, read_model_configs(run.model, run.storage))
    assert plan.sequence.tokens == 17_550 + 226
    assert plan.memory.frozen == 0  # latents precomputed
    published = published_gb * GIB
    assert abs(plan.memory.peak - published) / published < 0.25, plan.memory.gib()


def test_the_papers_shape_is_53328_tokens_and_the_frozen_parts_count_when_decoding():
    profile = _profile(model__source=str(MODELS / "CogVideoX-5b"))
    data = profile.model_dump()
    data["stages"]["sft"]["num_scenes"] = 3
    data["data"] = {"sft": "/mnt/manifests/sft.jsonl"}
    run = resolve_run(ClusterProfile.model_validate(data), "a100x8", "sft")
    plan = plan_run(run, read_model_configs(run.model, run.storage))
    assert plan.sequence.tokens == 53_328  # docs/method.md: 3 x 49 x 480x720
    # The frozen encoders stay fp32 in every precision (trainer/loop.py).
    assert plan.memory.frozen == 4 * (plan.parameters["text_encoder"] + plan.parameters["vae"])


def test_more_gpus_shrink_the_optimizer_partition_and_checkpointing_the_activations():
    configs = _configs("CogVideoX-5b")
    base = resolve_run(_profile(model__source=str(MODELS / "CogVideoX-5b")), "a100x8", "sft")
    plan = plan_run(base, configs)
    psi = plan.parameters["transformer"]
    assert plan.memory.params == pytest.approx(2 * psi, rel=1e-6)  # ZeRO-2 keeps bf16 weights
    assert plan.memory.optimizer == pytest.approx(12 * psi / 8, rel=1e-6)
    no_ckpt = plan_run(
        base.model_copy(
            update={
                "deepspeed": base.deepspeed.model_copy(update={"activation_checkpointing": False})
            }
        ),
        configs,
    )
    assert no_ckpt.memory.activations > 10 * plan.memory.activations / 2
    zero3 = plan_run(
        base.model_copy(update={"deepspeed": base.deepspeed.model_copy(update={"zero_stage": 3})}),
        configs,
    )
    assert zero3.memory.params < plan.memory.params / 6


def test_a_run_that_does_not_fit_gets_the_cheapest_change_that_does():
    profile = _profile(
        model__source=str(MODELS / "CogVideoX-5b"),
        workers__gpu_type="A10G",
        deepspeed__activation_checkpointing=False,
    )
    run = resolve_run(profile, "a100x8", "sft")
    plan = plan_with_suggestion(run, _configs("CogVideoX-5b"))
    assert not plan.fits and plan.suggestion
    from orchestrator.plan.estimate import _with

    fixed = plan_run(_with(run, plan.suggestion), _configs("CogVideoX-5b"))
    assert fixed.fits


def _invoke(*args):
    return CliRunner().invoke(cli, list(args))


def test_plan_prints_a_table_and_json_for_the_64_gpu_profile():
    source = f"model.source={MODELS / 'CogVideoX-5b'}"
    table = _invoke("plan", "--cluster", "a100x64", "--stage", "pretrain", "--set", source)
    assert table.exit_code == 0, table.output
    assert "64 x A100," in table.output and "peak" in table.output
    assert "53,328 tokens per sample" in table.output
    done = _invoke("plan", "--cluster", "a100x64", "--stage", "pretrain", "--set", source, "--json")
    found = json.loads(done.output)
    assert set(found) >= JSON_KEYS and set(found["breakdown_gib"]) == BREAKDOWN
    assert found["tokens_per_sample"] == 53_328 and found["fits"] is True
    assert found["per_gpu_peak_gib"] == pytest.approx(
        sum(found["breakdown_gib"].values()), abs=0.01
    )
    assert found["stage_gpu_hours"] > 0 and found["step_seconds"] > 0
    by_checkpointing = found["activations_gib_by_checkpointing"]
    assert by_checkpointing["off"] > 5 * by_checkpointing["on"]
    assert "GiB checkpointed" in table.output


def test_plan_prices_the_stage_from_the_profile(tmp_path):
    clusters = tmp_path / "clusters"
    clusters.mkdir()
    data = yaml.safe_load((ROOT / "clusters" / "a100x8.yaml").read_text())
    data["model"]["source"] = str(MODELS / "CogVideoX-2b")
    data["plan"] = {"usd_per_gpu_hour": 2.0, "mfu": 0.4}
    (clusters / "priced.yaml").write_text(yaml.safe_dump(data))
    done = CliRunner().invoke(
        cli,
        [
            "--clusters-dir",
            str(clusters),
            "plan",
            "--cluster",
            "priced",
            "--stage",
            "sft",
            "--json",
        ],
    )
    found = json.loads(done.output)
    assert found["mfu"] == 0.4
    assert found["cost_usd"] == pytest.approx(2.0 * found["stage_gpu_hours"], rel=1e-3)


def test_plan_names_a_missing_model_config_in_one_line(tmp_path):
    done = _invoke(
        "plan", "--cluster", "a100x8", "--stage", "sft", "--set", f"model.source={tmp_path}"
    )
    assert done.exit_code == 2
    assert "transformer/config.json not found" in done.output
    assert "Traceback" not in done.output and len(done.output.strip().splitlines()) == 1


def test_plan_imports_no_torch_ray_or_deepspeed():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from orchestrator.cli import cli\n"
        f"r = CliRunner().invoke(cli, ['plan', '--cluster', 'a100x64', '--stage', 'pretrain', "
        f"'--set', 'model.source={MODELS / 'CogVideoX-5b'}', '--json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in ('torch', 'ray', 'deepspeed', 'diffusers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_launch_dry_run_shows_the_plan():
    source = f"model.source={MODELS / 'CogVideoX-5b'}"
    done = _invoke(
        "launch", "--cluster", "a100x64", "--stage", "pretrain", "--set", source, "--dry-run"
    )
    assert done.exit_code == 0, done.output
    plan = done.output.split("# Plan (m2d plan)\n", 1)[1]
    assert "# plan: pretrain on a100x64 (64 x A100," in plan and "fits" in plan
    # The model is on S3, out of reach here: planned with the shipped configs, and said.
    unreachable = _invoke("launch", "--cluster", "a100x64", "--stage", "pretrain", "--dry-run")
    assert unreachable.exit_code == 0
    shipped = unreachable.output.split("# Plan (m2d plan)\n", 1)[1]
    assert shipped.startswith("# model.source = s3://m2d-models/CogVideoX-5b")
    assert "planning with the CogVideoX-5b configs m2d ships" in shipped.splitlines()[0]
    assert shipped.splitlines()[1:] == plan.splitlines()
    elsewhere = _invoke(
        "launch", "--cluster", "a100x64", "--stage", "pretrain", "--dry-run",
        "--set", "model.source=s3://m2d-models/other-model",
    )  # fmt: skip
    assert "# Plan: not available (model.source = s3://m2d-models/other-model" in elsewhere.output


def test_launch_refuses_a_run_that_does_not_fit_unless_forced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the local profile's data paths do not exist here
    tight = ("--set", "plan.gpu_memory_gib=0.0001")
    done = _invoke("launch", "--cluster", "local", "--stage", "pretrain", *tight)
    assert done.exit_code == 2
    line = done.output.strip()
    assert len(line.splitlines()) == 1
    assert "the plan needs" in line and "--force" in line
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    forced = _invoke("launch", "--cluster", "local", "--stage", "pretrain", *tight, "--force")
    # Past the plan: the next check is the training input, which is not there.
    assert forced.exit_code == 2 and "the plan needs" not in forced.output
    assert "pretrain" in forced.output and "not found" in forced.output


def test_a_toy_plan_is_printed_in_units_that_show_it():
    """`m2d plan --cluster local` printed every memory row as 0.00 GiB: a plan below a GiB
    is in MiB, parameter counts and FLOPs in the unit that fits."""
    table = _invoke("plan", "--cluster", "local", "--stage", "pretrain")
    assert table.exit_code == 0, table.output
    rows = [line for line in table.output.splitlines() if line.strip().startswith("peak")]
    peak = float(rows[0].split()[1])
    assert rows[0].split()[2] == "MiB" and 0.5 < peak < 1024
    assert "GiB" not in table.output.split("memory per worker")[1].split("compute")[0]
    assert "0.0 PFLOP" not in table.output and "B trained" not in table.output


@pytest.mark.parametrize(
    ("value", "count", "flops"),
    [
        (5_570_000_000, "5.57B", "5.6 GFLOP"),
        (42_200, "42.2K", "42,200 FLOP"),
        (812, "812", "812 FLOP"),
        (46.8e15, "4.68e+07B", "46.8 PFLOP"),
    ],
)
def test_counts_and_flops_take_the_largest_unit_that_keeps_them_at_one_or_more(value, count, flops):
    from orchestrator.plan.report import count as count_of
    from orchestrator.plan.report import flops as flops_of

    assert count_of(value) == count and flops_of(value) == flops


def test_a_plan_without_a_price_says_how_to_get_one():
    source = f"model.source={MODELS / 'CogVideoX-5b'}"
    table = _invoke("plan", "--cluster", "a100x64", "--stage", "pretrain", "--set", source)
    assert "cost: set plan.usd_per_gpu_hour in the profile" in table.output
    priced = _invoke(
        "plan", "--cluster", "a100x64", "--stage", "pretrain", "--set", source,
        "--set", "plan.usd_per_gpu_hour=2",
    )  # fmt: skip
    assert "cost at $2/GPU-hour: $" in priced.output and "cost: set" not in priced.output


@pytest.mark.parametrize("cluster", ["a100x64", "a100x8"])
def test_the_shipped_profiles_plan_offline_with_the_shipped_configs(cluster, monkeypatch):
    """The README's `m2d plan --cluster a100x64 --stage pretrain` on a fresh machine: its
    model is in a bucket it has no credentials for (a100x8's on a cluster's disk); the plan
    is made from m2d's copy of CogVideoX-5b's configs and says so in one line."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    done = _invoke("plan", "--cluster", cluster, "--stage", "pretrain")
    assert done.exit_code == 0, done.output
    note = done.stderr.strip().splitlines()
    assert len(note) == 1 and note[0].endswith("planning with the CogVideoX-5b configs m2d ships")
    direct = _invoke(
        "plan", "--cluster", cluster, "--stage", "pretrain",
        "--set", f"model.source={MODELS / 'CogVideoX-5b'}",
    )  # fmt: skip
    assert direct.stdout == done.stdout and direct.stderr == ""  # the same plan


def test_a_source_m2d_ships_no_configs_for_still_fails_in_one_line(tmp_path):
    done = _invoke(
        "plan", "--cluster", "a100x8", "--stage", "sft",
        "--set", f"model.source={tmp_path / 'CogVideoX-7b'}",
    )  # fmt: skip
    assert done.exit_code == 2 and "CogVideoX-7b: transformer/config.json not found" in done.output
