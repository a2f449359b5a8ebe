"""The cluster launcher config (infra/deploy/ray-cluster-a100x64.yaml) and the KubeRay
manifests (infra/deploy/kuberay/) hold the a100x64 profile's workers, as loaded by `m2d`
itself, and are what Ray's launcher and KubeRay's operator accept.

Parsed and checked here, never brought up (no cloud, no Kubernetes). Each check is a
function returning the problems it finds, run on the shipped file and on copies broken
on purpose, so that no check passes by finding nothing to look at.
"""

from __future__ import annotations

import copy
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement

from infra.config import WorkersConfig
from orchestrator import profiles

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "infra" / "deploy"
PROFILE = "a100x64"


def _yaml(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / name).read_text())


@cache
def _profile() -> profiles.LoadedProfile:
    """The a100x64 profile, ``extends:`` merged and validated, as `m2d` loads it."""
    return profiles.load_profile(profiles.find_profile(PROFILE, ROOT / "clusters"))


def _workers() -> WorkersConfig:
    return _profile().profile.workers


def _dashboard_port() -> int:
    """The port of the profile's Ray Jobs address (the dashboard's)."""
    return urlsplit(_profile().profile.ray.address).port


def _locked_ray() -> str:
    """The Ray version the image installs (requirements.lock)."""
    lines = (DEPLOY / "requirements.lock").read_text().splitlines()
    ray = next(Requirement(line) for line in lines if line.startswith("ray["))
    return next(iter(ray.specifier)).version


# --- the cluster launcher config ------------------------------------------------------


def test_the_launcher_config_passes_rays_own_validation():
    # What `ray up` checks before it contacts the cloud provider.
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _yaml("ray-cluster-a100x64.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))
    config["available_node_types"]["a100"]["resources"]["GPU"] = 7.5  # integers only
    with pytest.raises(ValidationError):
        validate_config(prepare_config(config))


def launcher_problems(config: dict[str, Any], workers: WorkersConfig, port: int) -> list[str]:
    """What keeps the launcher's nodes from holding the profile's workers."""
    per_node = workers.workers_per_node
    head_type = config["head_node_type"]
    head = config["available_node_types"][head_type]
    nodes = {k: v for k, v in config["available_node_types"].items() if k != head_type}
    problems = [] if head["resources"].get("GPU", 0) == 0 else ["the head offers GPUs"]
    if sum(n.get("min_workers", 0) for n in nodes.values()) != workers.nodes:
        problems.append(f"min_workers of the worker types do not add up to {workers.nodes}")
    for name, node in nodes.items():
        resources = node["resources"]
        if node.get("min_workers") != node.get("max_workers"):
            problems.append(f"{name}: min_workers != max_workers")
        if resources.get("GPU") != per_node * workers.gpus_per_worker:
            problems.append(f"{name}: GPU {resources.get('GPU')}, not {per_node}")
        if resources.get("CPU", 0) < per_node * workers.cpus_per_worker:
            problems.append(f"{name}: CPU {resources.get('CPU')} < {per_node} workers' CPUs")
        if workers.gpu_type and f"accelerator_type:{workers.gpu_type}" not in resources:
            problems.append(f"{name}: no accelerator_type:{workers.gpu_type} resource")
        if node.get("labels", {}).get("gpu_type", workers.gpu_type) != workers.gpu_type:
            problems.append(f"{name}: label gpu_type is not {workers.gpu_type}")
    if config["max_workers"] < workers.nodes:
        problems.append(f"max_workers {config['max_workers']} < {workers.nodes} nodes")
    start = " ".join(config["head_start_ray_commands"])
    if f"--dashboard-port={port}" not in start or "--dashboard-host=0.0.0.0" not in start:
        problems.append(f"the head's Jobs API does not listen on 0.0.0.0:{port}")
    return problems


def test_the_launcher_nodes_hold_the_profiles_workers():
    workers = _workers()
    assert (workers.num_workers, workers.nodes, workers.gpus_per_worker) == (64, 8, 1)
    assert launcher_problems(_yaml("ray-cluster-a100x64.yaml"), workers, _dashboard_port()) == []


def _set(keys: tuple[str | int, ...], value: Any):
    """An edit of a nested manifest: set the entry at ``keys`` (None: delete it)."""

    def edit(tree: Any) -> None:
        for key in keys[:-1]:
            tree = tree[key]
        if value is None:
            del tree[keys[-1]]
        else:
            tree[keys[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (_set(("available_node_types", "a100", "min_workers"), 7), "a100: min_workers != max"),
        (_set(("available_node_types", "a100", "resources", "GPU"), 4), "a100: GPU 4"),
        (_set(("available_node_types", "a100", "resources", "CPU"), 32), "a100: CPU 32"),
        (
            _set(("available_node_types", "a100", "resources", "accelerator_type:A100"), None),
            "a100: no ",
        ),
        (_set(("available_node_types", "a100", "labels"), {"gpu_type": "H100"}), "a100: label"),
        (_set(("available_node_types", "head", "resources", "GPU"), 1), "the head offers GPUs"),
        (_set(("head_start_ray_commands",), ["ray start --head"]), "the head's Jobs API"),
    ],
)
def test_the_launcher_check_finds_a_wrong_cluster(edit, problem):
    config = _yaml("ray-cluster-a100x64.yaml")
    edit(config)
    found = launcher_problems(config, _workers(), _dashboard_port())
    assert any(p.startswith(problem) for p in found), found


# --- the KubeRay manifests --------------------------------------------------------------

DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _cpus(quantity: str | int) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def kuberay_problems(manifest: dict[str, Any], kind: str, max_name: int) -> list[str]:
    """What KubeRay's operator refuses in any of its resources (name, kind, version)."""
    problems = [] if manifest.get("apiVersion") == "ray.io/v1" else ["apiVersion not ray.io/v1"]
    if manifest.get("kind") != kind:
        problems.append(f"kind is not {kind}")
    name = manifest.get("metadata", {}).get("name", "")
    if not DNS_1035.fullmatch(name) or len(name) > max_name:
        problems.append(f"name {name!r} is no DNS-1035 label of at most {max_name} characters")
    return problems


def _group_problems(group: dict[str, Any], name: str) -> list[str]:
    """A head or worker group as KubeRay validates it: a container with an image, and
    rayStartParams of strings without labels (those go in the group's `labels`)."""
    problems = []
    containers = group.get("template", {}).get("spec", {}).get("containers") or [{}]
    if not containers[0].get("image"):
        problems.append(f"{name}: template.spec.containers[0] has no image")
    params = group.get("rayStartParams")
    if not isinstance(params, dict) or "labels" in params:
        problems.append(f"{name}: rayStartParams missing or holding labels")
    elif any(not isinstance(value, str) for value in params.values()):
        problems.append(f"{name}: rayStartParams values must be strings")
    return problems


def raycluster_problems(cluster: dict[str, Any], workers: WorkersConfig, port: int) -> list[str]:
    """What KubeRay refuses, or what keeps the pods from holding the profile's workers."""
    per_node = workers.workers_per_node
    problems = kuberay_problems(cluster, "RayCluster", 53)
    spec = cluster["spec"]
    if spec.get("rayVersion") != _locked_ray():
        problems.append(f"rayVersion {spec.get('rayVersion')} is not the lock's ray")
    head = spec["headGroupSpec"]
    problems += _group_problems(head, "head")
    params = head.get("rayStartParams", {})
    if params.get("dashboard-host") != "0.0.0.0" or params.get("num-gpus") != "0":
        problems.append("head: rayStartParams need dashboard-host 0.0.0.0 and num-gpus 0")
    head_ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    if port not in head_ports:
        problems.append(f"head: no containerPort {port} for the Jobs API")
    groups = spec["workerGroupSpecs"]
    if sum(g.get("replicas", 0) for g in groups) != workers.nodes:
        problems.append(f"replicas do not add up to {workers.nodes} nodes")
    for group in groups:
        name = group.get("groupName") or "a worker group without groupName"
        problems += _group_problems(group, name)
        if not group.get("minReplicas") == group.get("replicas") == group.get("maxReplicas"):
            problems.append(f"{name}: minReplicas, replicas and maxReplicas differ")
        if group.get("labels", {}).get("gpu_type") != workers.gpu_type:
            problems.append(f"{name}: label gpu_type is not {workers.gpu_type}")
        problems += _pod_problems(group["template"]["spec"], name, per_node, workers)
    return problems


def _pod_problems(
    pod: dict[str, Any], name: str, per_node: int, workers: WorkersConfig
) -> list[str]:
    container = pod["containers"][0]
    limits = container.get("resources", {}).get("limits", {})
    problems = []
    if limits.get("nvidia.com/gpu") != per_node * workers.gpus_per_worker:
        problems.append(f"{name}: nvidia.com/gpu {limits.get('nvidia.com/gpu')}, not {per_node}")
    if _cpus(limits.get("cpu", 0)) < per_node * workers.cpus_per_worker:
        problems.append(f"{name}: cpu {limits.get('cpu')} < {per_node} workers' CPUs")
    memory = {
        v["name"] for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"
    }
    mounts = {m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"}
    if not memory & mounts:
        problems.append(f"{name}: no memory-backed /dev/shm (NCCL needs it)")
    return problems


def test_the_raycluster_holds_the_profiles_workers():
    cluster = _yaml("kuberay/raycluster-a100x64.yaml")
    assert raycluster_problems(cluster, _workers(), _dashboard_port()) == []


_WORKER = ("spec", "workerGroupSpecs", 0)
_LIMITS = (*_WORKER, "template", "spec", "containers", 0, "resources", "limits")


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (_set((*_WORKER, "replicas"), 7), "replicas do not add up"),
        (_set((*_WORKER, "maxReplicas"), 16), "a100: minReplicas"),
        (_set((*_LIMITS, "nvidia.com/gpu"), 4), "a100: nvidia.com/gpu 4"),
        (_set((*_LIMITS, "cpu"), "32"), "a100: cpu 32"),
        (_set((*_WORKER, "labels"), {}), "a100: label gpu_type"),
        (_set((*_WORKER, "rayStartParams"), {"labels": "gpu_type=A100"}), "a100: rayStartParams"),
        (_set((*_WORKER, "template", "spec", "volumes"), []), "a100: no memory-backed /dev/shm"),
        (
            _set(("spec", "headGroupSpec", "rayStartParams", "num-gpus"), 0),
            "head: rayStartParams need",
        ),
        (_set(("spec", "rayVersion"), "2.59.0"), "rayVersion 2.59.0"),
        (_set(("metadata", "name"), "M2D"), "name 'M2D'"),
    ],
)
def test_the_raycluster_check_finds_a_wrong_cluster(edit, problem):
    cluster = _yaml("kuberay/raycluster-a100x64.yaml")
    edit(cluster)
    found = raycluster_problems(cluster, _workers(), _dashboard_port())
    assert any(p.startswith(problem) for p in found), found


def rayjob_problems(job: dict[str, Any], cluster_name: str) -> list[str]:
    """What KubeRay refuses in the RayJob, and whether it runs on ``cluster_name``."""
    problems = kuberay_problems(job, "RayJob", 47)
    spec = job["spec"]
    if not spec.get("entrypoint"):
        problems.append("no entrypoint")
    if spec.get("clusterSelector", {}).get("ray.io/cluster") != cluster_name:
        problems.append(f"clusterSelector does not name the RayCluster {cluster_name}")
    if spec.get("backoffLimit", 0) > 0:
        problems.append("backoffLimit > 0 is refused with a clusterSelector")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    return problems


def test_the_rayjob_runs_on_the_raycluster():
    name = _yaml("kuberay/raycluster-a100x64.yaml")["metadata"]["name"]
    job = _yaml("kuberay/rayjob-pretrain.yaml")
    assert rayjob_problems(job, name) == []
    job["spec"]["clusterSelector"] = {"ray.io/cluster": "another"}
    job["spec"]["backoffLimit"] = 2
    assert len(rayjob_problems(job, name)) == 2


def test_the_rayjob_entrypoint_is_a_launch_that_resolves_on_the_profile():
    from orchestrator.commands.launch import launch

    argv = shlex.split(_yaml("kuberay/rayjob-pretrain.yaml")["spec"]["entrypoint"])
    assert argv[:2] == ["m2d", "launch"]
    params = launch.make_context("launch", argv[2:]).params  # parsed as `m2d` would
    assert (params["cluster_name"], params["stage"], params["follow"]) == (
        PROFILE,
        "pretrain",
        True,
    )
    loaded = _profile()
    run = profiles.resolve(loaded, "pretrain", profiles.parse_overrides(params["assignments"]))
    address = urlsplit(run.ray.address)
    assert (address.hostname, address.port) == ("127.0.0.1", _dashboard_port())  # the head's
    assert run.workers == loaded.profile.workers
    assert run.data.pretrain or run.data.pretrain_latents
