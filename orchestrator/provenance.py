"""What a launch records of where its run came from (``infra.run_folder.Provenance``): the
code it ships or runs (the commit of this checkout, and a dirty tree's diff), the installed
packages, the profile file, the DeepSpeed config and the data manifests' hashes. Written
into the run folder when the launcher creates it; the job tags its MLflow run with it.
"""

from __future__ import annotations

import hashlib
import platform
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path

from infra.config import RunConfig
from infra.deepspeed_config import deepspeed_config
from infra.run_folder import Provenance
from infra.storage import is_remote

#: The code a launch ships (``submit.shipped_code``) is this checkout.
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("m2d", "torch", "deepspeed", "ray", "diffusers", "transformers", "mlflow", "peft")
_MANIFESTS = ("pretrain", "sft", "pretrain_latents", "sft_latents")


def git_state(root: Path = ROOT) -> tuple[str, bool, str | None]:
    """The checkout's commit ('unknown' outside git), whether tracked files differ from
    it, and that difference (``git diff HEAD``; None when clean)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = (git("rev-parse", "HEAD") or "").strip() or "unknown"
    if commit == "unknown":
        return commit, False, None
    diff = git("diff", "HEAD", "--no-color") or ""
    return commit, bool(diff), diff or None


def package_versions() -> dict[str, str]:
    """The installed version of each package m2d's runs depend on (absent: not listed)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def file_sha256(path: str | None) -> str | None:
    """The sha256 of a local file (None: remote, missing or a folder)."""
    if not path or is_remote(path) or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def collect(run: RunConfig, profile: Path | None) -> tuple[Provenance, str | None]:
    """The provenance of a run about to be created, and the diff of a dirty checkout."""
    commit, dirty, diff = git_state()
    manifests = {
        key: file_sha256(getattr(run.data, key))
        for key in _MANIFESTS
        if getattr(run.data, key, None)
    }
    provenance = Provenance(
        git_commit=commit,
        git_dirty=dirty,
        packages=package_versions(),
        profile=None if profile is None else str(profile.resolve()),
        profile_sha256=file_sha256(None if profile is None else str(profile)),
        deepspeed=deepspeed_config(run),
        manifests=manifests,
        python=platform.python_version(),
        host=socket.gethostname(),
        launched_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    return provenance, diff
