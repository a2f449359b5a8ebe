"""The image's deploy assets (infra/deploy/Dockerfile, requirements.lock) agree with
pyproject.toml, the cluster profiles and the configs that name the image; NCCL/EFA are
set in the image alone and nothing switches their fast transports off.

The image is parsed and checked here, never built (no container daemon). Each check is a
function returning the problems it finds; every test runs it on the shipped file and on
a copy broken on purpose, so that no check passes by finding nothing to look at.
test_deploy_clusters.py checks the cluster launcher config and the KubeRay manifests.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from orchestrator import profiles

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "infra" / "deploy"
CLUSTERS = ROOT / "clusters"

# The CUDA of PyPI's Linux torch wheel, by torch release series: torch 2.13.0's wheel
# requires cuda-toolkit==13.0.3 (its metadata). DeepSpeed compiles its ops only with a
# toolkit of that same major.minor, so the image's base must carry it.
TORCH_WHEEL_CUDA = {"2.13": "13.0"}
# Compute capability of each Ray accelerator type a profile may name (workers.gpu_type).
COMPUTE_CAPABILITY = {
    "A100": "8.0",
    "A10G": "8.6",
    "L4": "8.9",
    "L40S": "8.9",
    "H100": "9.0",
    "H200": "9.0",
}


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _yaml(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / name).read_text())


# --- requirements.lock against pyproject.toml ----------------------------------------


def _requirements(lines: list[str]) -> dict[str, Requirement]:
    found = (Requirement(line) for line in lines if line.strip() and not line.startswith("#"))
    return {canonicalize_name(req.name): req for req in found}


def _declared() -> dict[str, Requirement]:
    return _requirements(_pyproject()["project"]["dependencies"])


def _lock_text() -> str:
    return (DEPLOY / "requirements.lock").read_text()


def lock_problems(lock_text: str, declared: dict[str, Requirement]) -> list[str]:
    """How the lock differs from pyproject's dependencies: names, extras, exact pins, ranges."""
    lock = _requirements(lock_text.splitlines())
    problems = [f"{name}: in pyproject, not in the lock" for name in declared.keys() - lock]
    problems += [f"{name}: in the lock, not in pyproject" for name in lock.keys() - declared]
    for name in declared.keys() & lock.keys():
        pins = [spec for spec in lock[name].specifier if spec.operator == "=="]
        if len(pins) != 1 or len(lock[name].specifier) != 1:
            problems.append(f"{name}: not one exact == pin ({lock[name].specifier})")
            continue
        if not declared[name].specifier.contains(pins[0].version, prereleases=True):
            problems.append(f"{name}=={pins[0].version} outside {declared[name].specifier}")
        if lock[name].extras != declared[name].extras:
            problems.append(f"{name}: extras {sorted(lock[name].extras)} in the lock")
    return problems


def _pin(name: str) -> str:
    return str(next(iter(_requirements(_lock_text().splitlines())[name].specifier)).version)


def test_the_lock_pins_exactly_pyprojects_dependencies():
    assert lock_problems(_lock_text(), _declared()) == []


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda text: text.replace("rich==15.0.0\n", ""), "rich: in pyproject, not in the lock"),
        (lambda text: text + "numpy==2.4.6\n", "numpy: in the lock, not in pyproject"),
        (lambda text: text.replace("click==8.5.1", "click==9.0.0"), "click==9.0.0 outside"),
        (lambda text: text.replace("pydantic==2.14.4", "pydantic>=2.7"), "pydantic: not one"),
        (lambda text: text.replace("ray[default,train]", "ray[default]"), "ray: extras"),
    ],
)
def test_the_lock_check_finds_a_wrong_lock(edit, problem):
    assert any(
        found.startswith(problem) for found in lock_problems(edit(_lock_text()), _declared())
    )


# --- the Dockerfile ---------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """``(KEYWORD, arguments)`` of each Dockerfile instruction, continuation lines joined
    and comments dropped, as Docker reads them."""
    found, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        keyword, _, arguments = (current + stripped).partition(" ")
        found.append((keyword.upper(), arguments.strip()))
        current = ""
    return found


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def _env(text: str) -> dict[str, str]:
    """Every variable the Dockerfile's ENV instructions set (``KEY=VALUE`` form)."""
    pairs = (
        word.partition("=")
        for key, args in instructions(text)
        if key == "ENV"
        for word in shlex.split(args)
    )
    return {name: value for name, _, value in pairs}


def _commands(text: str) -> list[str]:
    """The shell commands of the RUN instructions, split at ``&&``."""
    runs = (args for key, args in instructions(text) if key == "RUN")
    return [command.strip() for run in runs for command in run.split("&&")]


def image_tag(text: str) -> str:
    """The tag the Dockerfile's build line (a comment) gives the image."""
    match = re.search(r"^#\s+docker build .*-t (\S+) ", text, re.M)
    assert match, "the Dockerfile's header has no `docker build ... -t TAG .` line"
    return match.group(1)


def _lock_files(text: str) -> set[str]:
    """The lock where the image copies it, and the files its RUNs cut from it (grep)."""
    copies = [args.split() for key, args in instructions(text) if key == "COPY"]
    lock = {words[-1] for words in copies if words[0] == "infra/deploy/requirements.lock"}
    derived = {
        command.rpartition(">")[2].strip()
        for command in _commands(text)
        if ">" in command and any(path in command for path in lock)
    }
    return lock | derived


def install_problems(text: str) -> list[str]:
    """pip installs of anything but the lock's pins and the m2d source, and editable ones."""
    lock_files = _lock_files(text)
    problems = [] if lock_files else ["requirements.lock is not copied into the image"]
    for command in _commands(text):
        words = command.split()
        if "pip" not in words or "install" not in words:
            continue
        arguments = words[words.index("install") + 1 :]
        files = {arguments[i + 1] for i, word in enumerate(arguments[:-1]) if word == "-r"}
        names = [w for w in arguments if not w.startswith(("-", "/")) and w not in files]
        if "-e" in arguments or "--editable" in arguments:
            problems.append(f"editable install: {command}")
        if names or not files <= lock_files:
            problems.append(f"installs what the lock does not pin: {command}")
    return problems


def test_the_image_installs_from_the_lock_alone():
    assert install_problems(_dockerfile()) == []


@pytest.mark.parametrize(
    "extra",
    [
        "RUN pip install einops==0.8.2",
        "RUN pip install einops",
        "RUN pip install -r /tmp/extra.txt",
        "RUN pip install -e /tmp/m2d",
    ],
)
def test_the_install_check_finds_an_unpinned_install(extra):
    assert install_problems(_dockerfile() + extra + "\n")


def test_the_image_copies_every_m2d_package():
    packages = {
        p.rstrip("*") for p in _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = {args.split()[0] for key, args in instructions(_dockerfile()) if key == "COPY"}
    assert packages <= copied, packages - copied


def base_cuda(text: str) -> tuple[str, str]:
    """``(major.minor, flavour)`` of the Dockerfile's nvidia/cuda base image."""
    base = next(args for key, args in instructions(text) if key == "FROM")
    match = re.fullmatch(r"nvidia/cuda:(\d+\.\d+)\.\d+-(\w+)-ubuntu[\d.]+", base.split()[0])
    assert match, f"base {base!r} is not an nvidia/cuda image"
    return match.group(1), match.group(2)


def test_the_base_image_carries_the_cuda_of_the_pinned_torch():
    torch_series = ".".join(_pin("torch").split(".")[:2])
    assert torch_series in TORCH_WHEEL_CUDA, f"add torch {torch_series}'s wheel CUDA above"
    assert base_cuda(_dockerfile()) == (TORCH_WHEEL_CUDA[torch_series], "devel")  # nvcc


def deepspeed_problems(text: str, gpu_types: set[str]) -> list[str]:
    """Whether DeepSpeed's Adam ops are compiled at build time, for these GPUs."""
    env = _env(text)
    archs = set(re.split(r"[;\s]+", env.get("TORCH_CUDA_ARCH_LIST", "").replace("+PTX", "")))
    problems = [
        f"TORCH_CUDA_ARCH_LIST lacks {gpu} ({COMPUTE_CAPABILITY[gpu]})"
        for gpu in sorted(gpu_types)
        if COMPUTE_CAPABILITY[gpu] not in archs
    ]
    build = [c for c in _commands(text) if "pip install" in c and "deepspeed" in c]
    if not build:
        return [*problems, "no RUN installs deepspeed"]
    flags = set(shlex.split(build[0]))
    if not (
        {"DS_BUILD_OPS=1"} <= flags or {"DS_BUILD_FUSED_ADAM=1", "DS_BUILD_CPU_ADAM=1"} <= flags
    ):
        problems.append("DeepSpeed installs without DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1")
    if "--no-build-isolation" not in flags:
        problems.append("DeepSpeed builds in isolation, without the image's torch")
    return problems


def _profile_gpu_types() -> set[str]:
    loaded = (profiles.load_profile(path) for path in profiles.profile_paths(CLUSTERS))
    return {p.profile.workers.gpu_type for p in loaded if p.profile.workers.gpu_type}


def test_deepspeed_ops_are_prebuilt_for_every_profiles_gpu():
    gpu_types = _profile_gpu_types()
    assert "A100" in gpu_types
    assert gpu_types <= COMPUTE_CAPABILITY.keys(), "add the new gpu_type's compute capability"
    assert deepspeed_problems(_dockerfile(), gpu_types) == []


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("DS_BUILD_CPU_ADAM=1 ", "", "DeepSpeed installs without"),
        ("--no-build-isolation ", "", "DeepSpeed builds in isolation"),
        (
            'TORCH_CUDA_ARCH_LIST="8.0;9.0"',
            'TORCH_CUDA_ARCH_LIST="9.0"',
            "TORCH_CUDA_ARCH_LIST lacks",
        ),
    ],
)
def test_the_deepspeed_check_finds_ops_left_to_jit(old, new, problem):
    broken = _dockerfile().replace(old, new)
    assert broken != _dockerfile()
    assert any(p.startswith(problem) for p in deepspeed_problems(broken, {"A100", "H100"}))


def apt_packages(text: str) -> set[str]:
    """The Debian packages the image's RUNs install with apt-get."""
    commands = (c.split() for c in _commands(text) if c.startswith("apt-get install"))
    return {word for words in commands for word in words[2:] if not word.startswith("-")}


def test_the_image_has_the_tools_ray_runs_in_it():
    # The cluster launcher rsyncs into the container; KubeRay's probes call wget.
    assert {"rsync", "wget"} <= apt_packages(_dockerfile())
    assert apt_packages("RUN apt-get update && apt-get install -y rsync\n") == {"rsync"}


def runs_as(text: str) -> str | None:
    """The user the image's processes run as: its last USER, or None (root)."""
    users = [args.split(":")[0] for key, args in instructions(text) if key == "USER"]
    return users[-1] if users else None


def test_the_image_runs_as_a_non_root_user():
    assert runs_as(_dockerfile()) not in (None, "root", "0")
    assert runs_as("FROM x\nUSER 1001\nUSER root\n") == "root"
    assert runs_as("FROM x\n") is None


# --- one image everywhere ---------------------------------------------------------------


def configured_images() -> dict[str, str]:
    """Where each deploy config names an image, and which."""
    images = {"launcher docker.image": _yaml("ray-cluster-a100x64.yaml")["docker"]["image"]}
    cluster = _yaml("kuberay/raycluster-a100x64.yaml")["spec"]
    groups = {"head": cluster["headGroupSpec"]}
    groups.update((g["groupName"], g) for g in cluster["workerGroupSpecs"])
    for name, group in groups.items():
        for container in group["template"]["spec"]["containers"]:
            images[f"RayCluster {name}/{container['name']}"] = container["image"]
    return images


def test_every_config_names_the_dockerfiles_image_tag():
    tag = image_tag(_dockerfile())
    version = _pyproject()["project"]["version"]
    cuda = base_cuda(_dockerfile())[0].replace(".", "")
    assert tag.rpartition(":")[2] == f"{version}-cu{cuda}"
    images = configured_images()
    assert len(images) >= 3
    assert {where: image for where, image in images.items() if image != tag} == {}


# --- NCCL and EFA -----------------------------------------------------------------------

_NCCL_OR_FI = re.compile(r"\b(?:NCCL|FI)_[A-Z_]+")
# NCCL_IB_DISABLE / NCCL_P2P_DISABLE / NCCL_SHM_DISABLE set to 1, in the forms a shell,
# a Dockerfile, YAML or a Kubernetes env list write it.
_DISABLES = re.compile(r"NCCL_(?:IB|P2P|SHM)_DISABLE(?:\s*[=:]\s*|\s+|\s*,?\s*value:\s*)[\"']?1\b")


def test_nccl_and_efa_settings_come_from_the_image_alone():
    env = _env(_dockerfile())
    assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert env["NCCL_SOCKET_IFNAME"].startswith("^")  # an exclusion list
    assert {"lo", "docker"} <= set(env["NCCL_SOCKET_IFNAME"][1:].split(","))
    assert env["NCCL_DEBUG"] in ("WARN", "INFO")
    # The configs set none of their own, which would shadow the image's for some nodes.
    for path in [DEPLOY / "ray-cluster-a100x64.yaml", *sorted((DEPLOY / "kuberay").glob("*"))]:
        assert _NCCL_OR_FI.findall(path.read_text()) == [], path.relative_to(ROOT)


def disabled_transports(text: str) -> list[str]:
    return [match.group(0) for match in _DISABLES.finditer(text)]


def test_nothing_disables_infiniband_p2p_or_shared_memory():
    files = [p for folder in (DEPLOY, CLUSTERS) for p in sorted(folder.rglob("*")) if p.is_file()]
    assert len(files) >= 6
    found = {str(p.relative_to(ROOT)): disabled_transports(p.read_text()) for p in files}
    assert {path: hits for path, hits in found.items() if hits} == {}


@pytest.mark.parametrize(
    "text",
    [
        "ENV NCCL_IB_DISABLE=1",
        "ENV NCCL_P2P_DISABLE 1",
        "env_vars:\n  NCCL_SHM_DISABLE: '1'",
        'env:\n  - name: NCCL_IB_DISABLE\n    value: "1"',
        "- {name: NCCL_P2P_DISABLE, value: '1'}",
        "docker run -e NCCL_SHM_DISABLE=1 image",
    ],
)
def test_the_transport_check_finds_each_way_of_disabling(text):
    assert disabled_transports(text)
    assert disabled_transports(text.replace("1", "0")) == []
