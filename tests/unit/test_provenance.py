"""The reproducibility envelope (issue 29 point 5, first part): a launch records in the
run folder where the run came from - the commit and a dirty tree's diff, the installed
packages, the profile file's hash, the DeepSpeed config, the manifests' hashes - and the
job tags its MLflow run with it; a remote job learns the commit of the code it was shipped."""

from __future__ import annotations

import hashlib
import json
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from infra.deepspeed_config import deepspeed_config
from infra.errors import DataError
from infra.run_folder import (
    PROVENANCE,
    SOURCE_DIFF,
    read_provenance,
    write_provenance,
)
from orchestrator import profiles, provenance, runs
from orchestrator.submit import runtime_env
from trainer.job import RunFolder, provenance_tags

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    _git(repo, "add", "code.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    return repo


def test_git_state_names_the_commit_and_a_dirty_trees_diff(repo, tmp_path):
    head = _git(repo, "rev-parse", "HEAD").strip()
    assert provenance.git_state(repo) == (head, False, None)
    (repo / "code.py").write_text("x = 2\n")
    (repo / "untracked.txt").write_text("not part of the code\n")
    commit, dirty, diff = provenance.git_state(repo)
    assert (commit, dirty) == (head, True)
    assert "-x = 1\n+x = 2" in diff and "untracked" not in diff
    elsewhere = tmp_path / "not-git"
    elsewhere.mkdir()
    assert provenance.git_state(elsewhere) == ("unknown", False, None)


def test_a_runs_provenance_holds_what_it_ran_with(tmp_path):
    manifest = tmp_path / "pretrain.jsonl"
    manifest.write_text('{"path": "a.mp4"}\n')
    profile = CLUSTERS / "local.yaml"
    run = runs.with_absolute_paths(
        profiles.resolve(
            profiles.load_profile(profile),
            "pretrain",
            {"data": {"pretrain": str(manifest), "sft": "s3://bucket/sft.jsonl"}},
        )
    )
    found, diff = provenance.collect(run, profile)
    assert found.git_commit == _git(ROOT, "rev-parse", "HEAD").strip()
    assert found.git_dirty == bool(diff)
    assert found.packages["torch"] == metadata.version("torch")
    assert found.packages["m2d"] == metadata.version("m2d")
    assert found.profile_sha256 == hashlib.sha256(profile.read_bytes()).hexdigest()
    assert found.manifests == {
        "pretrain": hashlib.sha256(manifest.read_bytes()).hexdigest(),
        "sft": None,  # not readable from here: not hashed
    }
    assert found.deepspeed == deepspeed_config(run)

    folder = tmp_path / "runs" / "r1"
    folder.mkdir(parents=True)
    write_provenance(str(folder), None, found, "a diff\n")
    assert (folder / SOURCE_DIFF).read_text() == "a diff\n"
    assert read_provenance(str(folder), None) == found
    tags = provenance_tags(
        RunFolder(uri=str(folder), name="r1", parent=str(folder.parent), run=run)
    )
    assert tags["git_commit"] == found.git_commit
    assert json.loads(tags["m2d.packages"]) == found.packages
    assert tags["m2d.git_dirty"] == str(found.git_dirty).lower()


def test_a_missing_provenance_is_none_and_a_damaged_one_one_line(tmp_path):
    assert read_provenance(str(tmp_path), None) is None
    (tmp_path / PROVENANCE).write_text("{not json")
    with pytest.raises(DataError, match=r"unreadable provenance.json"):
        read_provenance(str(tmp_path), None)


def test_a_remote_job_is_told_the_commit_of_the_code_it_is_shipped():
    run = profiles.resolve(profiles.load_profile(CLUSTERS / "a100x64.yaml"), "pretrain", {})
    env = runtime_env(run)
    assert env["env_vars"]["M2D_GIT_COMMIT"] == _git(ROOT, "rev-parse", "HEAD").strip()
