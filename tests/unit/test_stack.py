"""The local stack's pieces that need no running service: Ray's command lines, the profile
it refuses, process liveness, and how Ray clients and remote jobs get their credentials."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from m2d_cli import run_m2d

from infra.processes import free_port, pid_alive
from orchestrator import profiles, ray_jobs, stack, submit
from orchestrator.runs import RunRecord

REPO = Path(__file__).resolve().parents[2]


def _ports(command: list[str]) -> list[int]:
    return [int(command[i + 1]) for i, arg in enumerate(command) if arg.endswith("-port")]


def test_ray_node_commands_name_their_addresses_and_ports():
    head = stack.ray_node_command(0, 6390, 2, dashboard_port=8300, multi_node=True)
    node = stack.ray_node_command(1, 6390, 1, multi_node=True)
    single = stack.ray_node_command(0, 6390, 2, dashboard_port=8300, multi_node=False)
    assert head[head.index("--node-ip-address") + 1] == "127.0.0.3"
    assert single[single.index("--node-ip-address") + 1] == "127.0.0.1"
    assert head[head.index("--dashboard-host") + 1] == "127.0.0.1"
    assert "--head" in head and head[head.index("--port") + 1] == "6390"
    assert node[node.index("--address") + 1] == "127.0.0.3:6390" and "--head" not in node
    assert node[node.index("--node-ip-address") + 1] == "127.0.0.2"
    assert node[node.index("--num-cpus") + 1] == "1"
    # Two nodes on one machine: none of Ray's fixed default ports, none shared.
    ports = _ports(head) + _ports(node)
    assert len(ports) == len(set(ports)) == 10 and 52365 not in ports
    assert [stack.node_ip(i) for i in range(4)] == [
        "127.0.0.3",
        "127.0.0.2",
        "127.0.0.4",
        "127.0.0.5",
    ]


def test_only_a_single_node_stack_runs_ray_in_its_loopback_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    # As after a local Ray in this process (init_ray turns Ray's multi-node mode off here).
    monkeypatch.setenv(stack.SINGLE_NODE_ENV, "0")
    single, multi = stack.ray_env(multi_node=False), stack.ray_env(multi_node=True)
    assert single[stack.SINGLE_NODE_ENV] == "0" and stack.SINGLE_NODE_ENV not in multi
    assert single["RAY_AUTH_MODE"] == "token" and single["GLOO_SOCKET_IFNAME"] == "lo"
    token = (tmp_path / "token").read_text()
    assert len(token) == 64 and oct((tmp_path / "token").stat().st_mode)[-3:] == "600"
    stack.ray_env(multi_node=True)
    assert (tmp_path / "token").read_text() == token  # a token is never replaced


def test_stack_refuses_a_profile_it_cannot_serve(tmp_path):
    env = {**os.environ, "M2D_HOME": str(tmp_path)}
    done = run_m2d(env, "stack", "up", "--cluster", "local")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "Error: tracking.uri = sqlite:///runs/mlflow.db: the local stack serves "
        "http://127.0.0.1:PORT only; set tracking.uri to such an address in profile local"
    ]
    assert not (tmp_path / "stack").exists() or not list((tmp_path / "stack").glob("*.pid"))


def test_the_localstack_profile_points_at_the_stack():
    loaded = profiles.load_profile(REPO / "clusters" / "localstack.yaml").profile
    found = stack.Stack(loaded, Path("/nonexistent"))
    assert (found.mlflow_port, found.s3_port, found.dashboard_port) == (5000, 9000, 8265)
    assert found.bucket == "m2d" and loaded.storage.credentials_file.startswith("~/")


def test_an_exited_unreaped_process_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while pid_alive(child.pid):  # a zombie until reaped below: exists, but does not run
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert Path(f"/proc/{child.pid}").exists()
    child.wait()
    assert pid_alive(os.getpid())


@pytest.mark.parametrize(
    ("mode", "token", "wanted"),
    [(None, True, "token"), (None, False, None), ("disabled", True, "disabled")],
)
def test_ray_clients_send_a_token_at_hand(tmp_path, monkeypatch, mode, token, wanted):
    with monkeypatch.context() as patch:
        for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
            patch.delenv(name, raising=False)
        if mode:
            patch.setenv("RAY_AUTH_MODE", mode)
        path = tmp_path / "token"
        if token:
            path.write_text("t" * 32)
        patch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
        # As in a fresh CLI process: Ray not imported yet, no cached mode to refresh.
        patch.delitem(sys.modules, "ray._raylet", raising=False)
        ray_jobs.client_auth()
        assert os.environ.get("RAY_AUTH_MODE") == wanted
    # This process's Ray (imported by an earlier test) must not keep a mode read meanwhile.
    ray_jobs.refresh_auth()


def test_remote_jobs_get_the_credentials_file_path_never_keys(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-ship")
    loaded = profiles.load_profile(REPO / "clusters" / "localstack.yaml")
    run = profiles.resolve(loaded, "pretrain", {})
    env = submit.runtime_env(run)
    assert env["env_vars"]["AWS_SHARED_CREDENTIALS_FILE"] == "~/.m2d/stack/aws_credentials"
    assert "do-not-ship" not in repr(env)
    record = RunRecord(
        name="r",
        cluster="localstack",
        stage="pretrain",
        run_dir="s3://m2d/runs/r",
        config_uri="s3://m2d/runs/r/run_config.json",
        kind="remote",
        storage=run.storage.model_dump(),
    )
    command = " ".join(submit.job_command(record))
    assert '"credentials_file":"~/.m2d/stack/aws_credentials"' in command
    assert '"endpoint_url":"http://127.0.0.1:9000"' in command and "do-not-ship" not in command


def test_a_port_held_by_another_process_is_refused_before_anything_starts(tmp_path):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        (tmp_path / "clusters").mkdir()
        (tmp_path / "clusters" / "mine.yaml").write_text(
            f"extends: {REPO / 'clusters' / 'localstack.yaml'}\n"
            f"storage: {{endpoint_url: 'http://127.0.0.1:{port}'}}\n"
            f"tracking: {{uri: 'http://127.0.0.1:{free_port()}'}}\n"
        )
        env = {
            **os.environ,
            "M2D_HOME": str(tmp_path),
            "M2D_CLUSTERS_DIR": str(tmp_path / "clusters"),
        }
        done = run_m2d(env, "stack", "up", "--cluster", "mine")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"Error: s3: 127.0.0.1:{port} is in use by a process this stack did not start; "
        "stop it, or set storage.endpoint_url to another port"
    ]
    assert not list((tmp_path / "stack").glob("*.pid"))  # mlflow was not started either
