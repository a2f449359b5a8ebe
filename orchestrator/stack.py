"""The local stack: the services of a real cluster, on this machine's loopback.

``m2d stack up`` starts an MLflow server (sqlite and artifacts in the stack folder), an S3
API server (``moto_server``) and a Ray head - and with ``--nodes 2`` a second Ray node -
at the addresses the ``localstack`` profile names, so ``m2d launch --cluster localstack``
goes through the Jobs API, an object store and a tracking server as it would on a cluster.

Each service is a process group of its own, started in the background; its pid file and
log live in one folder, ``$M2D_HOME/stack`` (default ``~/.m2d/stack``). ``up`` starts only
what is not running (idempotent), ``down`` stops every group (SIGTERM, then SIGKILL) and
removes its pid file, ``status`` reads the pid files.

MLflow, moto and the Ray dashboard listen on 127.0.0.1. A one-node stack's Ray is a node
at 127.0.0.1 with Ray's multi-node mode off, and then every Ray process binds loopback
too. More nodes need that mode on, and addresses of their own (Ray tells nodes apart by
address: 127.0.0.3 for the head, then 127.0.0.2, 127.0.0.4 ...); Ray then binds its gRPC
servers (GCS, raylets, agents) to all interfaces - Ray binds loopback only for a node at
127.0.0.1 - behind its token, which every connection needs. ``up`` says so.

moto keeps objects in memory: ``down`` copies every bucket into ``s3/`` of the stack
folder before stopping it, and ``up`` puts them back, so checkpoints outlive a restart
(not a crash of the server itself). The Ray token is Ray's own: ``RAY_AUTH_TOKEN_PATH``,
else ``~/.ray/auth_token``, generated there if missing and never replaced; the S3
credentials are the file the profile's ``storage.credentials_file`` names, written (with
made-up keys: moto accepts any) only if missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from infra.config import ClusterProfile
from infra.errors import ConfigError, ServiceError, StorageError, first_line
from infra.processes import free_port, pid_alive, port_in_use
from infra.ray_runtime import LOOPBACK_IFNAME

PROFILE = "localstack"
HEAD_IP = "127.0.0.3"
# Ray's switch of its multi-node mode (named for the platforms where it is off by default):
# off, a node keeps the loopback address it is given and binds loopback only.
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
STARTUP_S = 120.0
STOP_S = 20.0
BIN = Path(sys.executable).parent


def node_ip(index: int, multi_node: bool = True) -> str:
    """The address of Ray node ``index`` (0: the head): 127.0.0.3, then .2, .4, .5 ...;
    a head without other nodes: 127.0.0.1."""
    if index == 0:
        return HEAD_IP if multi_node else "127.0.0.1"
    return f"127.0.0.{2 if index == 1 else index + 2}"


def ray_token_path() -> Path:
    """Where Ray (and so every m2d command) finds the cluster's auth token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def ray_env(multi_node: bool) -> dict[str, str]:
    """The environment of the Ray processes: token auth on, this Python first on PATH
    (jobs run ``python -m ...``, as a cluster image's python would), the workers' process
    group (Gloo, NCCL) on the loopback interface, and Ray's multi-node mode only where
    the stack has more than one node."""
    token = ray_token_path()
    if not token.exists():
        token.parent.mkdir(parents=True, exist_ok=True)
        token.touch(mode=0o600)
        token.write_text(secrets.token_hex(32))
    env = {
        "GLOO_SOCKET_IFNAME": LOOPBACK_IFNAME,
        "NCCL_SOCKET_IFNAME": LOOPBACK_IFNAME,
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    if multi_node:  # a local Ray started in this process (init_ray) turned it off here
        env.pop(SINGLE_NODE_ENV, None)
    else:
        env[SINGLE_NODE_ENV] = "0"
    return env


def ray_node_command(
    index: int,
    gcs_port: int,
    num_cpus: int,
    dashboard_port: int | None = None,
    multi_node: bool = True,
) -> list[str]:
    """``ray start --block`` for node ``index`` of a cluster whose head's GCS listens on
    ``gcs_port``: the head (index 0, with the dashboard on 127.0.0.1) or one that joins it.

    Every port is named: Ray's fixed defaults (the job agent's 52365, metrics, the
    runtime-env agent) would collide between two nodes on one machine, or with another
    Ray here.
    """
    ip = node_ip(index, multi_node)
    command = [str(BIN / "ray"), "start", "--block", "--node-ip-address", ip]
    if index == 0:
        assert dashboard_port is not None, "the head serves the dashboard"
        command += ["--head", "--port", str(gcs_port), "--dashboard-host", "127.0.0.1"]
        command += ["--dashboard-port", str(dashboard_port)]
    else:
        command += ["--address", f"{HEAD_IP}:{gcs_port}"]
    for flag in (
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--metrics-export-port",
        "--runtime-env-agent-port",
    ):
        command += [flag, str(free_port())]
    return [*command, "--num-cpus", str(num_cpus), "--disable-usage-stats"]


def ray_node_name(index: int) -> str:
    return "ray-head" if index == 0 else f"ray-node-{index}"


def _loopback_port(uri: str, key: str, name: str) -> int:
    """The port of ``uri`` (``http://127.0.0.1:PORT``), or a ConfigError naming ``key``
    of profile ``name``."""
    parts = urlsplit(uri)
    if parts.scheme != "http" or parts.hostname != "127.0.0.1" or not parts.port:
        raise ConfigError(
            f"{key} = {uri}: the local stack serves http://127.0.0.1:PORT only; "
            f"set {key} to such an address in profile {name}"
        )
    return parts.port


@dataclass(frozen=True)
class Service:
    """One background process group of the stack."""

    name: str
    command: list[str]
    address: str
    ready: Callable[[], bool]
    env: dict[str, str] | None = None
    ports: tuple[tuple[int, str], ...] = ()  # (port on 127.0.0.1, profile key naming it)


class Stack:
    """The services of ``profile`` (called ``name``) whose state lives in ``folder``."""

    def __init__(self, profile: ClusterProfile, folder: Path, name: str = PROFILE) -> None:
        self.profile = profile
        self.folder = folder
        self.mlflow_port = _loopback_port(profile.tracking.uri, "tracking.uri", name)
        if not profile.storage.endpoint_url or not profile.storage.root.startswith("s3://"):
            raise ConfigError(
                f"storage: profile {name} must keep runs on the stack's S3 server; set "
                "storage.root to s3://BUCKET/PREFIX and storage.endpoint_url to its address"
            )
        endpoint = profile.storage.endpoint_url
        self.s3_port = _loopback_port(endpoint, "storage.endpoint_url", name)
        self.dashboard_port = _loopback_port(profile.ray.address, "ray.address", name)
        self.bucket = profile.storage.root.removeprefix("s3://").split("/", 1)[0]

    # -- state on disk -------------------------------------------------------------------

    def pid_file(self, name: str) -> Path:
        return self.folder / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def pid(self, name: str) -> int | None:
        """The pid of a running service ``name``; None (and no pid file) when it is not."""
        path = self.pid_file(name)
        try:
            pid = int(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        if pid_alive(pid) and _is_group_leader(pid):
            return pid
        path.unlink(missing_ok=True)  # stale: the process ended without `down`
        return None

    def known(self) -> list[str]:
        """The services a pid file names, in start order (the base services always)."""
        nodes = sorted(
            int(path.stem.removeprefix("ray-node-"))
            for path in self.folder.glob("ray-node-*.pid")
            if path.stem.removeprefix("ray-node-").isdigit()
        )
        return ["mlflow", "s3", ray_node_name(0), *(ray_node_name(i) for i in nodes)]

    def running(self) -> list[str]:
        """Names of the services with a live pid file, in start order."""
        return [name for name in self.known() if self.pid(name) is not None]

    def _gcs_port(self) -> int:
        """The head's GCS port: chosen when the head starts, kept in stack.json."""
        state = read_state(self.folder)
        if self.pid(ray_node_name(0)) is not None and "gcs_port" in state:
            return state["gcs_port"]
        port = free_port()
        write_state(self.folder, {**state, "gcs_port": port})
        return port

    # -- the services --------------------------------------------------------------------

    def services(self, nodes: int, cpus_per_node: int) -> list[Service]:
        mlflow = f"http://127.0.0.1:{self.mlflow_port}"
        s3 = f"http://127.0.0.1:{self.s3_port}"
        dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        found = [
            Service(
                "mlflow",
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.mlflow_port),
                    "--backend-store-uri",
                    f"sqlite:///{self.folder / 'mlflow.db'}",
                    "--artifacts-destination",
                    str(self.folder / "mlflow-artifacts"),
                    "--workers",
                    "1",
                ],
                mlflow,
                lambda: _answers(f"{mlflow}/health"),
                ports=((self.mlflow_port, "tracking.uri"),),
            ),
            Service(
                "s3",
                [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.s3_port)],
                s3,
                lambda: _answers(f"{s3}/moto-api/"),
                ports=((self.s3_port, "storage.endpoint_url"),),
            ),
        ]
        gcs_port, multi = self._gcs_port(), self._multi_node(nodes)
        env = ray_env(multi)
        for index in range(nodes):
            ip = node_ip(index, multi)
            found.append(
                Service(
                    ray_node_name(index),
                    ray_node_command(index, gcs_port, cpus_per_node, self.dashboard_port, multi),
                    f"{ip} (dashboard {dashboard})" if index == 0 else ip,
                    (lambda: _answers(f"{dashboard}/api/version"))
                    if index == 0
                    else (lambda ip=ip: self._node_alive(ip)),
                    env,
                    ((self.dashboard_port, "ray.address"),) if index == 0 else (),
                )
            )
        return found

    def _multi_node(self, nodes: int) -> bool:
        """Whether the Ray head runs (or is to run) in Ray's multi-node mode: decided when
        the head starts, by whether more than one node is asked for."""
        state = read_state(self.folder)
        if self.pid(ray_node_name(0)) is None:
            write_state(self.folder, {**state, "multi_node": nodes > 1})
            return nodes > 1
        multi = state.get("multi_node", False)
        if nodes > 1 and not multi:
            raise ConfigError(
                f"--nodes {nodes}: the stack's Ray head runs as a single loopback node; "
                f"run `m2d stack down`, then `m2d stack up --nodes {nodes}`"
            )
        return multi

    def _node_alive(self, ip: str) -> bool:
        from orchestrator.placement import cluster_nodes

        with contextlib.suppress(Exception):
            nodes = cluster_nodes(f"http://127.0.0.1:{self.dashboard_port}")
            return any(node.ip == ip for node in nodes)
        return False

    # -- commands ------------------------------------------------------------------------

    def up(self, nodes: int, cpus_per_node: int, echo: Callable[[str], None]) -> None:
        """Start what is not running, each waited for until it answers."""
        self.folder.mkdir(parents=True, exist_ok=True)
        services = self.services(nodes, cpus_per_node)
        missing = [service for service in services if self.pid(service.name) is None]
        for service in missing:  # all before any starts
            for port, key in service.ports:
                if port_in_use(port):
                    raise ServiceError(
                        f"{service.name}: 127.0.0.1:{port} is in use by a process this stack "
                        f"did not start; stop it, or set {key} to another port"
                    )
        self._credentials(echo)
        for service in services:
            pid = self.pid(service.name)
            if pid is not None:
                echo(f"{service.name}: already running (pid {pid}) at {service.address}")
                continue
            process = self._spawn(service)
            echo(f"{service.name}: started (pid {process.pid}) at {service.address}")
            self._wait_ready(service, process)
            if service.name == "s3":
                self._restore_buckets(echo)

    def down(self, echo: Callable[[str], None]) -> None:
        """Stop every running service, the Ray nodes first; moto's buckets are saved."""
        for name in reversed(self.running()):
            if name == "s3":
                self._save_buckets(echo)
            pid = self.pid(name)
            if pid is not None:
                stop_group(pid)
            self.pid_file(name).unlink(missing_ok=True)
            echo(f"{name}: stopped (pid {pid})")

    def status(self) -> list[tuple[str, str, str]]:
        """(name, state, where) per known service."""
        rows = []
        for name in self.known():
            pid = self.pid(name)
            state = f"running (pid {pid})" if pid else "stopped"
            rows.append((name, state, str(self.log_file(name))))
        return rows

    def _spawn(self, service: Service) -> subprocess.Popen:
        log = self.log_file(service.name).open("a")
        try:
            process = subprocess.Popen(
                service.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=service.env,
                cwd=self.folder,
            )
        finally:
            log.close()
        self.pid_file(service.name).write_text(str(process.pid))
        return process

    def _wait_ready(self, service: Service, process: subprocess.Popen) -> None:
        deadline = time.monotonic() + STARTUP_S
        while not service.ready():
            if process.poll() is not None:
                self.pid_file(service.name).unlink(missing_ok=True)
                raise ServiceError(
                    f"{service.name} exited with status {process.returncode} at start-up; "
                    f"see {self.log_file(service.name)}"
                )
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{service.name} did not answer at {service.address} within "
                    f"{STARTUP_S:.0f} s; see {self.log_file(service.name)}"
                )
            time.sleep(0.5)

    # -- S3: credentials and buckets -----------------------------------------------------

    def _credentials(self, echo: Callable[[str], None]) -> None:
        path = self.profile.storage.credentials_file
        if not path:
            return
        file = Path(path).expanduser()
        if file.exists():
            return
        file.parent.mkdir(parents=True, exist_ok=True)
        file.touch(mode=0o600)
        file.write_text(
            "[default]\n"
            f"aws_access_key_id = stack{secrets.token_hex(6)}\n"
            f"aws_secret_access_key = {secrets.token_hex(20)}\n"
        )
        echo(f"s3: credentials for the stack's server written to {file}")

    def _filesystem(self):
        from infra.storage import filesystem

        return filesystem(f"s3://{self.bucket}", self.profile.storage)[0]

    def _restore_buckets(self, echo: Callable[[str], None]) -> None:
        fs, saved = self._filesystem(), self.folder / "s3"
        buckets = sorted(p.name for p in saved.iterdir()) if saved.is_dir() else []
        for bucket in sorted({*buckets, self.bucket}):
            with contextlib.suppress(FileExistsError):
                fs.mkdir(bucket)
            if bucket in buckets:
                fs.put(f"{saved / bucket}/", f"{bucket}/", recursive=True)
                echo(f"s3: bucket {bucket} restored from {saved / bucket}")

    def _save_buckets(self, echo: Callable[[str], None]) -> None:
        """Copy every bucket into ``s3/`` (a fresh copy replaces the previous one only
        once it is complete)."""
        fs, saved = self._filesystem(), self.folder / "s3"
        try:
            fs.invalidate_cache()
            buckets = [entry.rstrip("/") for entry in fs.ls("", detail=False)]
            for bucket in buckets:
                fresh = saved / f".{bucket}.partial"
                _remove_tree(fresh)
                if fs.find(bucket):
                    fs.get(f"{bucket}/", f"{fresh}/", recursive=True)
                else:
                    fresh.mkdir(parents=True)
                _remove_tree(saved / bucket)
                fresh.rename(saved / bucket)
                echo(f"s3: bucket {bucket} saved to {saved / bucket}")
        except OSError as exc:
            raise StorageError(
                f"s3: could not save the buckets to {saved} ({first_line(exc)}); the server "
                "is left running - free disk space and run `m2d stack down` again"
            ) from None


def read_state(folder: Path) -> dict:
    """What ``up`` recorded in ``stack.json``: the profile and the head's GCS port."""
    try:
        return json.loads((folder / "stack.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def write_state(folder: Path, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "stack.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(folder / "stack.json")


def stop_group(pid: int, timeout: float = STOP_S) -> None:
    """SIGTERM to the process group ``pid`` leads, SIGKILL to it after ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    _reap(pid)


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is a child of this process (else it is init's to reap)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _is_group_leader(pid: int) -> bool:
    """Whether ``pid`` leads its own process group, as every stack service does (a pid
    reused by an unrelated process almost never does)."""
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        return True  # it answered (401 before a token, 404...)
    except OSError:
        return False
    return True


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
