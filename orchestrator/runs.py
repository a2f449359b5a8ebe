"""Run bookkeeping: names, run folders on storage, and the local registry of launches.

A run lives in ``{storage.root}/{run name}/``: the orchestrator writes
``run_config.json`` there before anything starts, the training job adds its checkpoints
(Ray Train uses the same folder as its experiment directory). The registry
(``$M2D_HOME/runs/{name}.json``, default ``~/.m2d``) remembers where each launch went -
local process or remote Ray job - so ``m2d status/logs/stop/runs`` can find it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infra import run_folder
from infra.checkpoint_layout import check_checkpoint, complete_checkpoint
from infra.config import RunConfig, StorageConfig
from infra.errors import ConfigError, first_line
from infra.processes import process_alive
from infra.run_folder import MANIFEST, PROVENANCE, RUN_CONFIG, SOURCE_DIFF, write_run_config
from infra.storage import filesystem, join
from infra.tracking import MLFLOW_RUN_FILE
from mask2dit.tiny import BUILT_IN_SOURCES
from orchestrator import profiles, ray_jobs

#: Encoder paths that name a built-in encoder (``evaluation.tiny``), not a folder.
BUILT_IN_ENCODERS = ("tiny",)


@dataclass
class RunRecord:
    """What the registry keeps about one launch."""

    name: str
    cluster: str
    stage: str
    run_dir: str
    config_uri: str
    kind: str  # "local" (a child process here) or "remote" (a Ray job)
    address: str = "local"
    submitted_at: float = field(default_factory=time.time)
    pid: int | None = None
    #: The local job's start time with its pid (``infra.processes.process_start``): a pid
    #: alone may since belong to another process, which `stop` must never signal.
    pid_start: int | None = None
    exit_code: int | None = None
    log_path: str | None = None
    tracking_uri: str | None = None
    experiment: str | None = None
    storage: dict = field(default_factory=dict)  # StorageConfig fields: endpoint, region
    smoke: bool = False  # a `m2d launch --smoke` run: never the start of a real stage
    #: A local run that `m2d stop` (or Ctrl-C in its launcher) asked to stop: it ends as
    #: STOPPED, not FAILED, whatever its exit status. Reset by the next start (--resume).
    stopped: bool = False
    #: The Ray job of the run's latest start (remote): its name, then ``NAME-resume-N``
    #: for each resume, since Ray keeps job names unique.
    job_id: str | None = None

    @property
    def config_folder(self) -> str:
        """The folder of the run's ``run_config.json`` (the run folder)."""
        return self.config_uri.rsplit("/", 1)[0]

    @property
    def ray_job(self) -> str:
        """The Ray job that status, logs and stop refer to."""
        return self.job_id or self.name

    @property
    def storage_config(self) -> StorageConfig | None:
        """How to reach the run folder (object-store endpoint and region)."""
        return StorageConfig(**self.storage) if self.storage else None

    def save(self) -> None:
        """Write (or rewrite) this record into the registry."""
        path = registry_dir() / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)


def m2d_home() -> Path:
    """Where m2d keeps this machine's state: ``$M2D_HOME``, default ``~/.m2d``."""
    return Path(os.environ.get("M2D_HOME", Path.home() / ".m2d"))


def registry_dir() -> Path:
    """Where launch records live: ``$M2D_HOME/runs``."""
    return m2d_home() / "runs"


def has_record(name: str) -> bool:
    """Whether the registry knows a run called ``name``."""
    return (registry_dir() / f"{name}.json").is_file()


def load_record(name: str) -> RunRecord:
    """The registry record of run ``name``; a ConfigError naming known runs if absent."""
    path = registry_dir() / f"{name}.json"
    if not path.is_file():
        known = [record.name for record in recent_records(limit=5)]
        hint = f" (recent: {', '.join(known)})" if known else ""
        raise ConfigError(f"no run named {name!r} in {registry_dir()}{hint}; see `m2d runs`")
    return _read_record(path)


def _read_record(path: Path) -> RunRecord:
    """A registry file as a record; a ConfigError naming the file if it is not one."""
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        return RunRecord(**data)
    except (OSError, ValueError, TypeError) as exc:  # unreadable, not JSON, wrong keys
        raise ConfigError(
            f"{path}: not a run record ({first_line(exc, 120)}); move it out of the registry "
            "or delete it"
        ) from None


def recent_records(limit: int = 20, warn: Callable[[str], None] | None = None) -> list[RunRecord]:
    """The newest launch records first; a file that is not a record is skipped (``warn``
    is told why), so one broken file does not hide every run."""
    paths = sorted(registry_dir().glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    records = []
    for path in paths:
        if len(records) == limit:
            break
        try:
            records.append(_read_record(path))
        except ConfigError as exc:
            if warn:
                warn(f"skipped {exc}")
    return records


#: What a run name may be: it names a folder on storage, a registry file, an MLflow run
#: and a Ray job, and is written after ``--resume`` and before ``:STEP`` in a checkpoint.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_run_name(name: str) -> str:
    """``name`` if it can name a new run; a ConfigError saying why not."""
    if not RUN_NAME.fullmatch(name):
        raise ConfigError(
            f"--name {name!r}: a run name is 1 to 100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if has_record(name):
        where = load_record(name).run_dir
        raise ConfigError(
            f"--name {name}: a run of that name exists ({where}); choose another name, or "
            f"continue it with `m2d launch --resume {name}`"
        )
    return name


def new_run_name(run: RunConfig, explicit: str | None = None) -> str:
    """``{cluster}-{stage}-{UTC time}-{4 random hex digits}`` unless the user named the run
    (checked): two launches in the same second get different names."""
    if explicit:
        return check_run_name(explicit)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return check_run_name(f"{run.cluster}-{run.stage}-{stamp}-{secrets.token_hex(2)}")


def run_dir(run: RunConfig, name: str) -> str:
    """The run's folder on storage."""
    return join(run.storage.root, name)


def create_run_folder(run: RunConfig, name: str) -> str:
    """Make the run folder and write ``run_config.json``; never touch an existing run.

    Returns the URI of the config file.
    """
    folder = run_dir(run, name)
    fs, path = filesystem(folder, run.storage)
    if fs.exists(path):
        raise ConfigError(
            f"run {name!r} already exists at {folder}; continue it with `m2d launch --resume "
            f"{name}` or pick another --name"
        )
    fs.makedirs(path, exist_ok=True)
    return write_run_config(folder, run.storage, run)


def discard_run_folder(record: RunRecord) -> None:
    """Undo ``create_run_folder`` for a run whose first job never started (Ray refused the
    submission): the launcher's own files go (the run config, the MLflow run's id, the
    provenance and a dirty tree's diff), then the folder if that leaves it empty, so the
    name can be launched again. Nothing else in the folder is touched."""
    fs, path = filesystem(record.config_folder, record.storage_config)
    for name in (RUN_CONFIG, MLFLOW_RUN_FILE, PROVENANCE, SOURCE_DIFF):
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(f"{path}/{name}")
    with contextlib.suppress(OSError):
        if not fs.ls(path):
            fs.rmdir(path)


def read_run_config(record: RunRecord) -> RunConfig:
    """Read back a run's saved config (for resume)."""
    return run_folder.read_run_config(
        record.config_folder, record.storage_config, fix="was the run folder moved?"
    )


def rewrite_run_config(record: RunRecord, run: RunConfig) -> str:
    """Make ``run`` the run's config (a resume on other workers); the config it replaces
    is kept beside it as ``run_config.UTCTIME.json``, whose URI is returned."""
    fs, path = filesystem(record.config_uri, record.storage_config)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    kept = f"{RUN_CONFIG.removesuffix('.json')}.{stamp}.json"
    if fs.exists(f"{path.rsplit('/', 1)[0]}/{kept}"):
        raise ConfigError(f"{kept} exists: the run was resized a moment ago; try again")
    write_run_config(record.config_folder, record.storage_config, run, kept=kept)
    return f"{record.config_uri.removesuffix('.json')}.{stamp}.json"


def checkpoints(record: RunRecord) -> list[str]:
    """The run's checkpoint folders, oldest first (Ray Train names sort by time)."""
    fs, path = filesystem(record.run_dir, record.storage_config)
    if not fs.exists(path):
        return []
    folders = (e["name"] for e in fs.ls(path, detail=True) if e["type"] == "directory")
    names = sorted(name.rstrip("/").rsplit("/", 1)[-1] for name in folders)
    return [join(record.run_dir, name) for name in names if name.startswith("checkpoint_")]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def latest_checkpoint(record: RunRecord, warn: Callable[[str], None] = _warn) -> str:
    """The newest complete checkpoint of a run (newer incomplete ones skipped with a
    warning each); a ConfigError if it has none."""
    found = checkpoints(record)
    if not found:
        raise ConfigError(f"run {record.name} has no checkpoint yet (looked in {record.run_dir})")
    uri = complete_checkpoint(found, record.storage_config, warn)
    if uri is None:
        raise ConfigError(
            f"run {record.name} has no complete checkpoint ({len(found)} incomplete); "
            f"`m2d checkpoints {record.name}` shows what each lacks"
        )
    return uri


def checkpoint_at(record: RunRecord, step: int, warn: Callable[[str], None] = _warn) -> str:
    """The run's checkpoint taken at ``step``, which must be complete; a ConfigError
    naming the steps it has otherwise."""
    found = checkpoints(record)
    wanted = [uri for uri in found if uri.rstrip("/").endswith(f"checkpoint_{step:08d}")]
    if not wanted:
        steps = ", ".join(str(int(uri.rsplit("_", 1)[-1])) for uri in found) or "none yet"
        raise ConfigError(f"run {record.name} has no checkpoint at step {step}; it has: {steps}")
    state = check_checkpoint(wanted[0], record.storage_config)
    if state.complete:
        return wanted[0]
    era = (check_checkpoint(uri, record.storage_config) for uri in found)
    if not any(state.manifest or state.listed for state in era):
        warn(f"{wanted[0]} has no {MANIFEST} (written by an older m2d): using it unverified")
        return wanted[0]
    raise ConfigError(
        f"run {record.name}: the checkpoint at step {step} is incomplete ({state.problem}); "
        f"pick another (`m2d checkpoints {record.name}`)"
    )


def resolve_run(
    clusters_dir: str | None, cluster: str, stage: str, assignments: Sequence[str] = ()
) -> RunConfig:
    """What every command runs: profile ``cluster`` (from ``clusters_dir``, else the
    default folder) + the stage's recipe + ``--set KEY=VALUE`` assignments, validated once,
    local paths made absolute."""
    loaded = profiles.load_profile(
        profiles.find_profile(cluster, profiles.clusters_dir(clusters_dir))
    )
    return with_absolute_paths(
        profiles.resolve(loaded, stage, profiles.parse_overrides(assignments))
    )


def absolute(value: str | None, key: str = "a path") -> str | None:
    """A local path made absolute (so a job started elsewhere finds it); URIs as they are.
    A path through a symlink loop is a ConfigError naming ``key``."""
    if value is None or "://" in value:
        return value
    try:
        return str(Path(value).expanduser().resolve())
    except (RuntimeError, OSError) as exc:  # pathlib: RuntimeError("Symlink loop from ...")
        raise ConfigError(
            f"{key}: {value} cannot be resolved ({first_line(exc)}); point it at a real folder"
        ) from None


def model_path(value: str | None, built_in: Collection[str] = BUILT_IN_SOURCES) -> str | None:
    """:func:`absolute`, but a name in ``built_in`` (default: the built-in models, ``tiny``
    and ``toy``; ``BUILT_IN_ENCODERS`` for an encoder path) stays a name."""
    return value if value in built_in else absolute(value, "model.source")


def with_absolute_paths(run: RunConfig) -> RunConfig:
    """Local relative paths made absolute, so a job started elsewhere finds the same files.

    Covers the storage root, the data manifests and latents, a local model folder and a relative
    sqlite tracking store; URIs are left as they are.
    """

    tracking = run.tracking.uri
    if tracking.startswith("sqlite:///") and not tracking.startswith("sqlite:////"):
        tracking = "sqlite:///" + absolute(tracking.removeprefix("sqlite:///"))
    return run.model_copy(
        update={
            "storage": run.storage.model_copy(
                update={"root": absolute(run.storage.root, "storage.root")}
            ),
            "data": run.data.model_copy(
                update={
                    name: absolute(value, f"data.{name}")
                    for name, value in run.data
                    if isinstance(value, str)
                }
            ),
            "model": run.model.model_copy(update={"source": model_path(run.model.source)}),
            "tracking": run.tracking.model_copy(update={"uri": tracking}),
        }
    )


def job_alive(record: RunRecord) -> bool:
    """Whether a local run's job process (the one the record names, not just its pid)
    still runs."""
    return record.pid is not None and process_alive(record.pid, record.pid_start)


def local_state(record: RunRecord) -> str:
    """SUCCEEDED / FAILED / STOPPED / RUNNING / LOST (the launching process died first)."""
    if record.exit_code == 0:
        return "SUCCEEDED"
    if record.exit_code is None and job_alive(record):
        return "RUNNING"
    if record.stopped:
        return "STOPPED"
    return "LOST" if record.exit_code is None else f"FAILED (exit {record.exit_code})"


def check_not_running(record: RunRecord) -> None:
    """A ConfigError if the run's job still runs: a second job on the same run folder
    would write the same checkpoints and take over the record that `stop` reads."""
    state = state_of(record)
    if state in ("RUNNING", "PENDING"):
        job = f"pid {record.pid}" if record.kind == "local" else f"Ray job {record.ray_job}"
        raise ConfigError(
            f"run {record.name} is {state.lower()} ({job}); wait for it, or stop it with "
            f"`m2d stop {record.name}` before resuming it"
        )


def state_of(record: RunRecord) -> str:
    """The run's state: Ray's job status for remote runs, the process's for local ones."""
    if record.kind == "local":
        return local_state(record)
    return str(ray_jobs.remote_call(record, "get_job_status").value)


def latest_finished(cluster: str, stage: str) -> RunRecord | None:
    """The newest successful (non-smoke) run of ``stage`` on ``cluster``, if any."""
    for record in recent_records(limit=200):
        same = record.cluster == cluster and record.stage == stage and not record.smoke
        if same and state_of(record) == "SUCCEEDED":
            return record
    return None
