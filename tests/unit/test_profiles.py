"""Cluster profiles: shipped ones validate, malformed ones fail with one precise line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from infra.config import STAGES
from orchestrator import profiles
from orchestrator.cli import cli
from orchestrator.commands.cluster import profile_schema

CLUSTERS = Path(__file__).resolve().parents[2] / "clusters"
SHIPPED = sorted(CLUSTERS.glob("*.yaml"))

VALID = """\
workers:
  num_workers: 2
deepspeed:
  precision: fp32
storage:
  root: ./runs
tracking:
  uri: sqlite:///runs/mlflow.db
model:
  source: tiny
stages:
  pretrain:
    global_batch: 2
  sft:
    global_batch: 2
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _validate(path: Path):
    return CliRunner().invoke(cli, ["cluster", "validate", str(path)])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_profile_validates_for_both_stages(path):
    loaded = profiles.load_profile(path)
    for stage in STAGES:
        run = profiles.resolve(loaded, stage, {})
        assert run.cluster == path.stem and run.stage == stage


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_profile_names_the_schema(path):
    assert path.read_text().splitlines()[0] == "# yaml-language-server: $schema=schema.json"


def test_schema_file_is_current():
    assert (CLUSTERS / "schema.json").read_text() == profile_schema(), (
        "clusters/schema.json is stale: run `m2d cluster schema --write`"
    )


def test_required_profiles_exist():
    names = {p.stem for p in SHIPPED}
    assert {"local", "a100x64"} <= names
    a100x64 = profiles.load_profile(CLUSTERS / "a100x64.yaml").profile
    assert (a100x64.workers.nodes, a100x64.workers.num_workers) == (8, 64)
    assert a100x64.deepspeed.zero_stage == 2 and a100x64.deepspeed.precision == "bf16"
    assert a100x64.storage.root.startswith("s3://")
    local = profiles.load_profile(CLUSTERS / "local.yaml").profile
    assert local.ray.address == "local" and local.model.source == "tiny"
    assert local.workers.num_workers == 2 and local.workers.gpus_per_worker == 0


def test_paper_recipe_defaults():
    loaded = profiles.load_profile(CLUSTERS / "a100x8.yaml")
    pretrain = profiles.resolve(loaded, "pretrain", {}).recipe
    sft = profiles.resolve(loaded, "sft", {}).recipe
    assert (pretrain.steps, pretrain.global_batch, pretrain.learning_rate) == (10_000, 8, 1e-5)
    assert (pretrain.betas, pretrain.weight_decay, pretrain.eps) == ((0.9, 0.999), 0.03, 1e-10)
    assert (pretrain.warmup_steps, pretrain.frames, pretrain.num_scenes) == (100, 49, 3)
    assert (pretrain.height, pretrain.width, pretrain.mask_policy) == (480, 720, "v2")
    assert (pretrain.extension_prob, sft.extension_prob) == (0.0, 0.5)


def test_extends_merges_nested_keys(tmp_path):
    _write(tmp_path, "base", VALID)
    child = _write(
        tmp_path,
        "child",
        """\
        extends: base
        deepspeed:
          zero_stage: 3
        stages:
          sft:
            steps: 7
            warmup_steps: 1
        """,
    )
    loaded = profiles.load_profile(child)
    assert loaded.profile.deepspeed.zero_stage == 3
    assert loaded.profile.deepspeed.precision == "fp32"  # kept from base
    run = profiles.resolve(loaded, "sft", {})
    assert (run.recipe.steps, run.recipe.global_batch) == (7, 2)


# (profile text, expected substrings of the single error line). "{f}" is the file name.
MALFORMED = {
    "unknown-top-key": (VALID + "workerz: {}\n", ["{f}:16:", "workerz", "unknown key"]),
    "unknown-nested-key-suggests": (
        VALID.replace("precision: fp32", "precision: fp32\n  zero_stag: 3"),
        ["{f}:5:", "deepspeed.zero_stag", "did you mean 'zero_stage'"],
    ),
    "wrong-type": (
        VALID.replace("num_workers: 2", "num_workers: two"),
        ["{f}:2:", "workers.num_workers", "integer"],
    ),
    "missing-required-section": (
        VALID.replace("model:\n  source: tiny\n", ""),
        ["{f}:1:", "model", "required key is missing"],
    ),
    "missing-required-nested": (
        VALID.replace("  root: ./runs\n", "  region: eu-west-1\n"),
        ["{f}:5:", "storage.root", "required key is missing"],
    ),
    "zero-workers": (
        VALID.replace("num_workers: 2", "num_workers: 0"),
        ["{f}:2:", "workers.num_workers", "greater than or equal to 1"],
    ),
    "two-gpus-per-worker": (
        VALID.replace("num_workers: 2", "num_workers: 2\n  gpus_per_worker: 2"),
        ["{f}:3:", "workers.gpus_per_worker", "one GPU"],
    ),
    "workers-not-divisible-by-nodes": (
        VALID.replace("num_workers: 2", "num_workers: 3\n  nodes: 2"),
        ["workers.num_workers", "multiple of nodes"],
    ),
    "param-offload-needs-zero3": (
        VALID.replace("precision: fp32", "precision: bf16\n  offload_param: cpu").replace(
            "num_workers: 2", "num_workers: 2\n  gpus_per_worker: 1"
        ),
        ["deepspeed.offload_param", "zero_stage: 3"],
    ),
    "fp16-on-cpu-workers": (
        VALID.replace("precision: fp32", "precision: fp16"),
        ["{f}:4:", "deepspeed.precision", "fp32 or bf16"],
    ),
    "bad-zero-stage": (
        VALID.replace("precision: fp32", "precision: fp32\n  zero_stage: 1"),
        ["{f}:5:", "deepspeed.zero_stage", "2 or 3"],
    ),
    "yaml-syntax": (VALID.replace("num_workers: 2", "num_workers: [2"), ["{f}:", "YAML syntax"]),
    "not-a-mapping": ("- just\n- a list\n", ["{f}:1:", "mapping"]),
    "empty-file": ("", ["{f}:1:", "mapping"]),
    "global-batch-mismatch": (
        VALID.replace("global_batch: 2\n  sft", "global_batch: 8\n  sft"),
        ["{f}:13:", "recipe.global_batch", "stages.pretrain.global_batch: 2"],
    ),
    "secret-in-runtime-env": (
        VALID + "runtime_env:\n  env_vars:\n    AWS_SECRET_ACCESS_KEY: abc\n",
        ["runtime_env.env_vars", "credential"],
    ),
    "password-in-tracking-uri": (
        VALID.replace("sqlite:///runs/mlflow.db", "http://me:hunter2@mlflow:5000"),
        ["{f}:8:", "tracking.uri", "must not contain a password"],
    ),
    "ray-client-address": (
        VALID + "ray:\n  address: ray://head:10001\n",
        ["{f}:17:", "ray.address", "8265"],
    ),
    "multi-node-local-storage": (
        VALID.replace("num_workers: 2", "num_workers: 2\n  nodes: 2")
        + "ray:\n  address: http://head:8265\n",
        ["storage.root", "shared storage"],
    ),
    "unknown-stage": (
        VALID.replace("  sft:\n", "  sfft:\n"),
        ["stages.sfft", "'pretrain' or 'sft'"],
    ),
    "frames-not-4k-plus-1": (
        VALID.replace("global_batch: 2\n  sft", "global_batch: 2\n    frames: 48\n  sft"),
        ["stages.pretrain.frames", "4k+1"],
    ),
    "duplicate-key": (VALID + "model:\n  source: tiny\n", ["{f}:16:", "model", "duplicate key"]),
    "extends-missing-parent": ("extends: nowhere\n" + VALID, ["{f}:1:", "extends", "nowhere"]),
    "unknown-mask-policy": (
        VALID.replace("global_batch: 2\n  sft", "global_batch: 2\n    mask_policy: v3\n  sft"),
        ["stages.pretrain.mask_policy", "unknown mask policy 'v3'"],
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_profile_gives_one_clear_line(tmp_path, case):
    text, expected = MALFORMED[case]
    path = _write(tmp_path, case, text)
    result = _validate(path)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for fragment in expected:
        assert fragment.format(f=path) in lines[0], (fragment, lines[0])


def test_extends_cycle_is_reported(tmp_path):
    _write(tmp_path, "a", "extends: b\n" + VALID)
    path_b = _write(tmp_path, "b", "extends: a\n" + VALID)
    result = _validate(path_b)
    assert result.exit_code == 2 and "cycle" in result.output


def test_missing_file(tmp_path):
    result = _validate(tmp_path / "absent.yaml")
    assert result.exit_code == 2
    assert f"{tmp_path / 'absent.yaml'}: no such profile file" in result.output


def test_unknown_cluster_name_suggests():
    result = CliRunner().invoke(cli, ["launch", "--cluster", "a100x6", "--stage", "sft"])
    assert result.exit_code == 2
    assert "unknown cluster 'a100x6'; did you mean 'a100x64'?" in result.output


def test_validate_reports_every_bad_file(tmp_path):
    good = _write(tmp_path, "good", VALID)
    bad = _write(tmp_path, "bad", VALID.replace("num_workers: 2", "num_workers: x"))
    worse = _write(tmp_path, "worse", VALID + "oops: 1\n")
    result = CliRunner().invoke(cli, ["cluster", "validate", str(good), str(bad), str(worse)])
    assert result.exit_code == 2
    assert f"ok  {good}" in result.output
    assert str(bad) in result.output and str(worse) in result.output


@pytest.mark.parametrize("name", ["local", "toy"])
def test_cluster_show_prints_each_stage_as_a_launch_resolves_it(name):
    import yaml

    shown = CliRunner().invoke(cli, ["cluster", "show", name])
    assert shown.exit_code == 0, shown.output
    stages = yaml.safe_load(shown.output)["stages"]
    loaded = profiles.load_profile(CLUSTERS / f"{name}.yaml")
    for stage in STAGES:
        run = profiles.resolve(loaded, stage, {})
        assert stages[stage] == run.recipe.model_dump(mode="json"), stage
    assert stages["sft"]["extension_prob"] == 0.5 and stages["pretrain"]["extension_prob"] == 0
