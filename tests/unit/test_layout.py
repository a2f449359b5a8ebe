"""The folders are the architecture: imports point one way, and our names resolve here."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mask2dit", "orchestrator", "trainer", "datajobs", "sampler", "evaluation", "infra")

# What each package must never import (ours and third-party), anywhere in its code.
FORBIDDEN = {
    "mask2dit": {
        "orchestrator",
        "trainer",
        "sampler",
        "infra",
        "evaluation",
        "ray",
        "deepspeed",
        "mlflow",
        "click",
    },
    "infra": {"orchestrator", "trainer", "datajobs", "sampler", "mask2dit", "evaluation"},
    # The training worker runs no data job: the direction is datajobs -> trainer.
    "trainer": {"orchestrator", "sampler", "datajobs"},
    # The data jobs: started by the CLI as subprocesses; they may use the trainer's readers.
    "datajobs": {"orchestrator", "sampler"},
    "sampler": {"orchestrator", "trainer", "datajobs"},
    # Scores what the trainer's data and the sampler's videos are; imports neither.
    "evaluation": {
        "orchestrator",
        "trainer",
        "datajobs",
        "sampler",
        "mask2dit",
        "ray",
        "deepspeed",
    },
    "orchestrator": {"trainer", "datajobs", "sampler", "mask2dit", "evaluation"},
}
# Exceptions by package: torch-free modules of mask2dit. Configuration validates mask
# policies with one.
ALLOWED = {
    "infra": {"mask2dit.policy"},
    # The planner reads the tiny model's configs and counts attention under a mask policy.
    "orchestrator": {"mask2dit.policy", "mask2dit.tiny"},
}
# Imported at module level, these would make `m2d --help` slow.
HEAVY = {"torch", "ray", "deepspeed", "diffusers", "transformers", "mlflow"}


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Dotted names of the absolute imports in a file."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _roots(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_dependencies_point_one_way(package):
    for path in _files(package):
        bad = _roots(_imports(path) - ALLOWED.get(package, set())) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_orchestrator_modules_import_nothing_heavy_at_module_level():
    for path in _files("orchestrator"):
        bad = _roots(_imports(path, top_level_only=True)) & HEAVY
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)} at module level"


@pytest.mark.parametrize("package", PACKAGES)
def test_package_names_resolve_inside_this_repository(package):
    module = importlib.import_module(package)
    assert Path(module.__file__).resolve().parent == ROOT / package


@pytest.mark.parametrize("module", ["policy.py", "tiny.py"])
def test_the_torch_free_modules_of_mask2dit_need_no_torch(module):
    # infra/config.py validates mask policies at the edge, and `m2d plan` reads the tiny
    # model's configs, where torch must not load.
    assert not _roots(_imports(ROOT / "mask2dit" / module)) & HEAVY


def test_the_checker_sees_imports():
    # Guard against a checker that passes vacuously: it must find what is really there.
    assert "pydantic" in _roots(_imports(ROOT / "infra" / "config.py"))
    assert "mask2dit.policy" in _imports(ROOT / "infra" / "config.py")
    assert "click" in _roots(_imports(ROOT / "orchestrator" / "cli.py", top_level_only=True))


def test_test_modules_have_unique_basenames():
    # tests/ folders are not packages: pytest imports each file by its basename, so two
    # test_x.py in different folders make collection fail.
    names = [path.name for path in (ROOT / "tests").rglob("test_*.py")]
    assert sorted(names) == sorted(set(names))


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _internal_imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` a file imports anywhere (``from pkg import mod`` names
    the module ``pkg.mod``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found & modules


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> modules it imports), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return [*stack[stack.index(imported) :], imported]
            if imported not in state and (found := visit(imported)):
                return found
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_a_package(package):
    files = {_module_name(path): path for path in _files(package)}
    modules = set(files) - {package}  # `from pkg import mod` is not an import of pkg/__init__
    graph = {name: _internal_imports(path, modules) - {name} for name, path in files.items()}
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"b"}}) is None


def test_method_citations_point_at_sections_that_exist():
    """Code cites the method in docs/method.md by section, never a file outside the
    repository."""
    import re

    headings = set(re.findall(r"^## §(\d+) ", (ROOT / "docs" / "method.md").read_text(), re.M))
    assert headings == {str(n) for n in range(1, 10)}
    cited = set()
    for path in [*(p for package in PACKAGES for p in _files(package)), *_files("tests")]:
        text = path.read_text()
        outside = "METHOD" + ".md"  # spelled so that this file does not cite it
        assert outside not in text, f"{path.relative_to(ROOT)} cites {outside}"
        for group in re.findall(r"docs/method\.md ((?:§\d+(?:-§\d+)?(?:, )?)+)", text):
            cited.update(re.findall(r"§(\d+)", group))
    assert cited and cited <= headings, cited - headings


def test_commands_do_not_import_each_other():
    """What two commands share lives in orchestrator/ (jobs, submit, runs, ...), not in one
    of them; only a command group imports its subcommands (the CLI, `m2d data`)."""
    groups = {ROOT / "orchestrator" / "cli.py", ROOT / "orchestrator" / "commands" / "data.py"}
    for path in (ROOT / "orchestrator" / "commands").glob("*.py"):
        if path in groups:
            continue
        others = {n for n in _imports(path) if n.startswith("orchestrator.commands")}
        assert not others, f"{path.name} imports {sorted(others)}"
