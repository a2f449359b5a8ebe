"""Placement from the profile: Ray Train's ScalingConfig, and the pre-submit check that a
cluster's nodes can hold the workers (a request Ray can never meet waits forever)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from infra.config import ClusterProfile, WorkersConfig, resolve_run
from infra.errors import ConfigError
from orchestrator.placement import Node, check_cluster, placement_lines

ROOT = Path(__file__).resolve().parents[2]


def _run(name: str = "a100x64", **workers):
    data = yaml.safe_load((ROOT / "clusters" / f"{name}.yaml").read_text())
    profile = ClusterProfile.model_validate(data) if "extends" not in data else None
    if profile is None:
        from orchestrator.profiles import load_profile

        profile = load_profile(ROOT / "clusters" / f"{name}.yaml").profile
    return resolve_run(profile, name, "pretrain", {"workers": workers} if workers else None)


def _gpu_node(ip: str, gpus: int = 8, cpus: int = 96, label: str = "A100") -> Node:
    return Node(ip, {"CPU": cpus, "GPU": gpus, f"accelerator_type:{label}": 1.0})


def test_the_scaling_config_carries_placement_and_ray_s_own_gpu_label():
    from trainer.job import scaling_config

    config = scaling_config(_run())
    assert config.num_workers == 64 and config.placement_strategy == "PACK"
    assert config.accelerator_type == "A100"  # what Ray detects, not A100-80G
    assert config.resources_per_worker == {"CPU": 8, "GPU": 1}
    spread = scaling_config(_run(placement="STRICT_SPREAD", nodes=64))
    assert spread.placement_strategy == "STRICT_SPREAD"


def test_strict_strategies_must_agree_with_the_node_count():
    with pytest.raises(ValueError, match="one worker per node"):
        WorkersConfig(num_workers=4, nodes=2, placement="STRICT_SPREAD")
    with pytest.raises(ValueError, match="one node"):
        WorkersConfig(num_workers=4, nodes=2, placement="STRICT_PACK")


def test_a_cluster_that_can_hold_the_workers_passes():
    check_cluster(_run(), [_gpu_node(f"10.0.0.{i}") for i in range(8)])


@pytest.mark.parametrize(
    "nodes, missing",
    [
        ([_gpu_node(f"10.0.0.{i}") for i in range(7)], "the cluster has 7"),
        ([_gpu_node(f"10.0.0.{i}", label="H100") for i in range(8)], "label A100"),
        ([_gpu_node(f"10.0.0.{i}", gpus=4) for i in range(16)], "8 GPU"),
        ([_gpu_node(f"10.0.0.{i}", cpus=32) for i in range(8)], "64 CPU"),
        ([], "no alive node"),
    ],
)
def test_a_cluster_that_cannot_gets_one_line_saying_what_is_missing(nodes, missing):
    with pytest.raises(ConfigError) as raised:
        check_cluster(_run(), nodes)
    message = str(raised.value)
    assert missing in message and "8 node(s)" in message and "--force" in message
    assert "\n" not in message


def test_dry_run_placement_lines():
    lines = placement_lines(_run())
    assert lines[0] == "workers: 64 on 8 node(s), 8 per node, Ray placement PACK"
    assert lines[2] == "per node: 64 CPU, 8 GPU (A100)"


def test_strict_spread_needs_one_worker_on_each_of_nodes():
    run = _run(placement="STRICT_SPREAD", nodes=64)
    check_cluster(run, [_gpu_node(f"10.0.{i // 250}.{i % 250}", gpus=1, cpus=8) for i in range(64)])
    with pytest.raises(ConfigError, match="1 worker"):
        check_cluster(run, [_gpu_node(f"10.0.0.{i}") for i in range(8)])


def test_a_remote_job_ships_this_checkouts_packages_and_no_secrets(monkeypatch):
    from orchestrator.submit import SHIPPED_PACKAGES, runtime_env

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    env = runtime_env(_run())
    assert env["py_modules"] == [str(ROOT / package) for package in SHIPPED_PACKAGES]
    pyproject = (ROOT / "pyproject.toml").read_text()
    installed = re.search(r"include = \[(.*)\]", pyproject).group(1)
    assert set(SHIPPED_PACKAGES) == {p.strip(' "*') for p in installed.split(",")}
    assert {"__pycache__", "runs/", "data/", ".venv/"} <= set(env["excludes"])
    assert env["env_vars"]["PYTHONSAFEPATH"] == "1"  # the job's cwd cannot shadow them
    assert "image_uri" not in env  # an image is an opt-in (runtime_env.image)
    assert "s3cr3t" not in repr(env)
    off = _run().model_copy(
        update={"runtime_env": _run().runtime_env.model_copy(update={"ship_code": False})}
    )
    assert "py_modules" not in runtime_env(off)


def test_dry_run_shows_what_ships():
    from click.testing import CliRunner

    from orchestrator.cli import cli

    done = CliRunner().invoke(
        cli, ["launch", "--cluster", "a100x64", "--stage", "pretrain", "--dry-run"]
    )
    shipped = done.output.split("# Runtime environment (shipped with the job)\n", 1)[1]
    assert f"#   {ROOT / 'trainer'}  " in shipped and "excluded: __pycache__" in shipped
