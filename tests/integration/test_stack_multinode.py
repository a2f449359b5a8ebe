"""`m2d stack` and a two-node Ray cluster on one machine, as a user drives them.

The stack runs for a profile of its own that extends `clusters/localstack.yaml` with free
ports and a credentials file in the test's folder; every `m2d` command runs in a
subprocess whose environment is a user's shell: no RAY_AUTH_MODE, no AWS keys - only the
files the stack wrote. Ray's own records (its State API, queried from a subprocess with
the stack's token) say which node each worker and actor ran on.
"""

from __future__ import annotations

import collections
import configparser
import contextlib
import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from m2d_cli import ROOT, run_m2d, wait_state

from infra.processes import free_port, pid_alive
from orchestrator.stack import HEAD_IP, node_ip

pytestmark = pytest.mark.integration

PROFILE = "stack"
# Long enough that the node is lost mid-run on a loaded machine too: 40 steps were done
# before the kill landed once (a 2-core machine running the whole suite).
STEPS, EVERY = 120, 8


def _user_env(root: Path) -> dict[str, str]:
    drop = ("RAY_", "AWS_", "MLFLOW_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        M2D_HOME=str(root / "home"),
        M2D_CLUSTERS_DIR=str(root / "clusters"),
        RAY_AUTH_TOKEN_PATH=str(root / "ray_token"),
    )
    return env


@pytest.fixture
def stack(tmp_path):
    """A profile for the stack on free ports; `m2d stack down` (then kill by pid) after."""
    (tmp_path / "clusters").mkdir()
    ports = {name: free_port() for name in ("ray", "s3", "mlflow")}
    (tmp_path / "clusters" / f"{PROFILE}.yaml").write_text(
        f"extends: {ROOT / 'clusters' / 'localstack.yaml'}\n"
        f"ray: {{address: 'http://127.0.0.1:{ports['ray']}'}}\n"
        "storage:\n"
        "  root: s3://m2d/runs\n"
        f"  endpoint_url: http://127.0.0.1:{ports['s3']}\n"
        f"  credentials_file: {tmp_path / 'aws_credentials'}\n"
        f"tracking: {{uri: 'http://127.0.0.1:{ports['mlflow']}', experiment: stack-it}}\n"
        "data: {synthetic: true}\n"
    )
    env = _user_env(tmp_path)
    folder = tmp_path / "home" / "stack"
    info = {"env": env, "folder": folder, "root": tmp_path, "ports": ports}
    try:
        yield info
    finally:
        down = run_m2d(env, "stack", "down", timeout=180)
        for pid_file in folder.glob("*.pid"):  # what `down` left: by process group
            pid = int(pid_file.read_text())
            if pid_alive(pid):
                os.killpg(pid, 9)
        assert down.returncode == 0, down.stderr


def _up(stack, *args: str) -> subprocess.CompletedProcess:
    done = run_m2d(stack["env"], "stack", "up", "--cluster", PROFILE, *args, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _pids(stack) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in stack["folder"].glob("*.pid")}


def _s3(stack):
    import s3fs

    keys = configparser.ConfigParser()
    keys.read(stack["root"] / "aws_credentials")
    return s3fs.S3FileSystem(
        key=keys["default"]["aws_access_key_id"],
        secret=keys["default"]["aws_secret_access_key"],
        client_kwargs={"endpoint_url": f"http://127.0.0.1:{stack['ports']['s3']}"},
    )


_RECORDS = """
import json, sys
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors, list_nodes
address = sys.argv[1]
nodes = {n.node_id: [n.node_ip, n.state] for n in list_nodes(address=address, detail=True)}
actors = [
    [a.class_name, a.node_id, a.job_id]
    for a in list_actors(address=address, detail=True, limit=10000)
]
jobs = {j.submission_id: j.job_id for j in JobSubmissionClient(address).list_jobs()}
print(json.dumps({"nodes": nodes, "actors": actors, "jobs": jobs}))
"""


def ray_records(stack) -> dict:
    """Ray's nodes (id -> [ip, state]), actors ([class, node id, job id]) and jobs
    (submission id -> job id), from the State API as Ray keeps them."""
    env = {**stack["env"], "RAY_AUTH_MODE": "token"}
    address = f"http://127.0.0.1:{stack['ports']['ray']}"
    done = subprocess.run(
        [sys.executable, "-c", _RECORDS, address], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def hosts_of(records: dict, job: str, class_part: str) -> list[tuple[str, str, str]]:
    """(node id, ip, node state) of every actor of Ray job ``job`` whose class name holds
    ``class_part`` and that was placed on a node (a worker group torn down while its
    placement was pending has actors that never ran anywhere)."""
    job_id = records["jobs"][job]
    return [
        (node, *records["nodes"][node])
        for name, node, actor_job in records["actors"]
        if actor_job == job_id and class_part in name and node
    ]


def _loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip.removeprefix("::ffff:")).is_loopback


def _listeners(pids: list[int]) -> set[str]:
    """Addresses the processes of these groups (leaders and descendants) listen on."""
    found = set()
    for pid in pids:
        leader = psutil.Process(pid)
        for process in [leader, *leader.children(recursive=True)]:
            try:
                connections = process.net_connections(kind="inet")
            except psutil.Error:
                continue
            found |= {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN}
    return found


def test_stack_up_is_idempotent_binds_loopback_and_keeps_buckets_across_down(stack):
    first = _up(stack)
    started = _pids(stack)
    assert set(started) == {"mlflow", "s3", "ray-head"}, first.stdout
    assert "m2d launch --cluster stack" in first.stdout
    again = _up(stack)
    assert again.stdout.count("already running") == 3 and _pids(stack) == started

    status = run_m2d(stack["env"], "stack", "status")
    assert status.returncode == 0
    for name, pid in started.items():
        assert f"running (pid {pid})" in next(
            line for line in status.stdout.splitlines() if line.startswith(name)
        )
    # A one-node stack: every listener of every service (Ray's too) is on loopback.
    addresses = _listeners(list(started.values()))
    assert addresses and all(_loopback(a) for a in addresses), addresses
    refused = run_m2d(stack["env"], "stack", "up", "--cluster", PROFILE, "--nodes", "2")
    assert refused.returncode == 2 and "m2d stack down" in refused.stderr, refused.stderr

    fs = _s3(stack)
    fs.pipe("m2d/runs/kept/file.txt", b"a user's checkpoint")
    down = run_m2d(stack["env"], "stack", "down", timeout=180)
    assert down.returncode == 0, down.stderr
    assert "bucket m2d saved" in down.stdout
    assert not any(pid_alive(pid) for pid in started.values())
    assert not list(stack["folder"].glob("*.pid"))
    assert "stopped" in run_m2d(stack["env"], "stack", "status").stdout

    back = _up(stack)
    assert "bucket m2d restored" in back.stdout
    fs.invalidate_cache()
    assert _s3(stack).cat("m2d/runs/kept/file.txt") == b"a user's checkpoint"


def _kill_raylet(stack, node: str) -> None:
    """The node is lost: its raylet SIGKILLed by pid, then what ran under it (the training
    worker would otherwise go on a while without its raylet, and on a loaded machine
    could finish the run before Ray saw the node go)."""
    leader = psutil.Process(_pids(stack)[node])
    below = leader.children(recursive=True)
    (raylet,) = [p for p in below if p.name() == "raylet"]
    raylet.kill()
    for process in below:
        with contextlib.suppress(psutil.Error):
            process.kill()
    deadline = time.monotonic() + 60  # `ray start --block` ends when its raylet does
    while pid_alive(leader.pid):
        assert time.monotonic() < deadline, f"{node} outlived its raylet"
        time.sleep(0.5)


def _run_name(launched: subprocess.CompletedProcess) -> str:
    line = next(line for line in launched.stdout.splitlines() if line.startswith("run "))
    return line.split()[1].rstrip(":")


def test_two_nodes_survive_a_lost_node_then_sft_and_sampling_use_both(stack):
    """Pretrain with one worker per node, the second node's raylet killed after a
    checkpoint and a replacement node brought up: the run resumes from the checkpoint and
    finishes; SFT from it and sample-batch then run on both nodes."""
    up = _up(stack, "--nodes", "2", "--cpus-per-node", "1")
    assert "multi-node mode" in up.stdout
    env = stack["env"]
    services = [_pids(stack)[name] for name in ("mlflow", "s3")]
    assert all(_loopback(a) for a in _listeners(services))
    spread = ["--set", "workers.nodes=2", "--set", "workers.placement=STRICT_SPREAD"]
    recipe = ["--set", "recipe.frames=17", "--set", "recipe.height=48", "--set", "recipe.width=48"]
    launched = run_m2d(
        env,
        "launch", "--cluster", PROFILE, "--stage", "pretrain", *spread, *recipe,
        "--set", f"recipe.steps={STEPS}", "--set", f"fault_tolerance.checkpoint_every={EVERY}",
        "--set", "fault_tolerance.max_failures=3",
    )  # fmt: skip
    assert launched.returncode == 0, launched.stdout + launched.stderr
    name = _run_name(launched)

    fs = _s3(stack)
    # Reported to Ray Train and complete: the controller writes the manifest after the
    # report (a file of the checkpoint on storage says only that its upload has begun).
    first = f"m2d/runs/{name}/checkpoint_{EVERY:08d}/manifest.json"
    deadline = time.monotonic() + 300
    while not fs.exists(first):
        assert time.monotonic() < deadline, run_m2d(env, "logs", name).stdout[-3000:]
        time.sleep(0.5)
        fs.invalidate_cache()
    lost = next(node for node, (ip, _) in ray_records(stack)["nodes"].items() if ip == node_ip(1))
    _kill_raylet(stack, "ray-node-1")
    replaced = _up(stack, "--nodes", "2", "--cpus-per-node", "1")
    assert "ray-node-1: started" in replaced.stdout

    assert wait_state(env, name, {"SUCCEEDED", "FAILED", "STOPPED"}, timeout=600) == "SUCCEEDED"
    log = run_m2d(env, "logs", name, "--all").stdout  # every rank's lines
    resumed = {int(step) for step in re.findall(r"rank 0 resumed at step (\d+)", log)}
    assert resumed and all(0 < s < STEPS and s % EVERY == 0 for s in resumed), log[-3000:]
    assert "node_rank 1, local_rank 0 of 1" in log and "node_rank 0, local_rank 0 of 1" in log

    records = ray_records(stack)
    head = next(node for node, (ip, state) in records["nodes"].items() if ip == HEAD_IP)
    new = next(
        node for node, (ip, state) in records["nodes"].items()
        if ip == node_ip(1) and state == "ALIVE"
    )  # fmt: skip
    assert records["nodes"][lost] == [node_ip(1), "DEAD"] and new != lost
    workers = collections.Counter(node for node, *_ in hosts_of(records, name, "RayTrainWorker"))
    # One worker per node in every attempt: the head's, the lost node's, the replacement's.
    # How many attempts the replacement took is not promised (max_failures=3): on a loaded
    # machine a restart can itself fail once, and the next one runs there again.
    assert set(workers) == {head, lost, new}, workers
    assert workers[lost] == 1 and workers[head] == workers[lost] + workers[new], workers

    from mlflow.tracking import MlflowClient

    run_id = json.loads(fs.cat(f"m2d/runs/{name}/mlflow_run.json"))["run_id"]
    client = MlflowClient(f"http://127.0.0.1:{stack['ports']['mlflow']}")
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))  # each step once

    sft = run_m2d(
        env, "launch", "--cluster", PROFILE, "--stage", "sft", *spread, *recipe,
        "--set", "recipe.steps=2", "--set", "recipe.warmup_steps=1", "--follow",
    )  # fmt: skip
    assert sft.returncode == 0, sft.stdout[-3000:] + sft.stderr
    sft_name = _run_name(sft)
    records = ray_records(stack)
    hosts = {node for node, *_ in hosts_of(records, sft_name, "RayTrainWorker")}
    assert hosts == {head, new}

    # The SFT job's actors and placement group are let go of asynchronously: until then
    # the head's CPU is held and the second sampling actor would wait for it while the
    # first renders every story alone.
    idle = subprocess.run(
        [sys.executable, "-c", _WAIT_IDLE, f"http://127.0.0.1:{stack['ports']['ray']}"],
        env={**env, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(ROOT / "tests")},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert idle.returncode == 0, idle.stdout[-3000:] + idle.stderr[-3000:]

    prompts = stack["root"] / "stories.jsonl"
    stories = [{"id": f"s{i}", "prompts": ["a cat", "the cat sleeps"]} for i in range(2)]
    prompts.write_text("".join(json.dumps(story) + "\n" for story in stories))
    sampled = run_m2d(
        env, "sample-batch", "--cluster", PROFILE, "--checkpoint", "latest-sft",
        "--prompts", str(prompts), "--out", "s3://m2d/samples", "--steps", "2",
        "--num-actors", "2", "--no-tracking",
    )  # fmt: skip
    assert sampled.returncode == 0, sampled.stdout + sampled.stderr
    job = sampled.stdout.split("submitted sample-batch job ")[1].split()[0]
    client_env = {**env, "RAY_AUTH_MODE": "token"}
    address = f"http://127.0.0.1:{stack['ports']['ray']}"
    status = subprocess.run(
        [sys.executable, "-c", _WAIT_JOB, address, job],
        env=client_env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert status.stdout.strip().endswith("SUCCEEDED"), status.stdout[-3000:] + status.stderr
    records = ray_records(stack)
    actors = collections.Counter(node for node, *_ in hosts_of(records, job, "StoryRenderer"))
    assert set(actors) == {head, new}, actors
    fs.invalidate_cache()
    assert len(fs.glob("m2d/samples/*/s*/0/meta.json")) == 2


_WAIT_JOB = """
import sys, time
from ray.job_submission import JobSubmissionClient
client = JobSubmissionClient(sys.argv[1])
while not (status := client.get_job_status(sys.argv[2])).is_terminal():
    time.sleep(1)
if status.value != "SUCCEEDED":
    print(client.get_job_logs(sys.argv[2])[-3000:])
print(status.value)
"""

_WAIT_IDLE = """
import sys, time
from ray_session import cluster_busy, cluster_report
deadline = time.monotonic() + 240
while cluster_busy(sys.argv[1]):
    if time.monotonic() > deadline:
        sys.exit(cluster_report(sys.argv[1]))
    time.sleep(1)
"""
