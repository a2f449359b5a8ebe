"""Reading cluster profiles: YAML with line numbers, ``extends:``, and one-line errors.

Every problem becomes a :class:`ConfigError` whose message is one line of the form
``FILE:LINE: dotted.key: what is wrong and how to fix it``.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from infra import safe_yaml
from infra.config import ClusterProfile, KeyProblem, RunConfig, Stage, deep_merge, resolve_run
from infra.errors import ConfigError

SCHEMA_FILE = "schema.json"
KeyPath = tuple[str, ...]


@dataclass(frozen=True)
class LoadedProfile:
    """A validated profile and where each of its keys was written."""

    name: str
    path: Path
    profile: ClusterProfile
    origin: dict[KeyPath, tuple[Path, int]] = field(repr=False)

    def locate(self, key: KeyPath) -> str:
        """``FILE:LINE`` of ``key``, or of its nearest written ancestor."""
        return _locate(key, self.origin, self.path)


def clusters_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The profile folder: explicit, $M2D_CLUSTERS_DIR, ./clusters, or the repository's."""
    where = "--clusters-dir (or M2D_CLUSTERS_DIR)"
    for source, candidate in ((where, explicit), (where, os.environ.get("M2D_CLUSTERS_DIR"))):
        if candidate:
            if not Path(candidate).is_dir():  # else every profile would be "not found"
                raise ConfigError(
                    f"{source} {candidate}: no such folder; name the folder of the cluster "
                    "profiles (clusters/*.yaml)"
                )
            return Path(candidate)
    local = Path("clusters")
    if local.is_dir():
        return local
    return Path(__file__).resolve().parent.parent / "clusters"


def profile_paths(directory: Path) -> list[Path]:
    """Every ``*.yaml`` profile in ``directory``, sorted by name."""
    return sorted(directory.glob("*.yaml"))


def find_profile(name: str, directory: Path) -> Path:
    """The file of profile ``name``; a ConfigError with suggestions if there is none."""
    path = directory / f"{name}.yaml"
    if path.is_file():
        return path
    known = [p.stem for p in profile_paths(directory)]
    hint = _did_you_mean(name, known)
    raise ConfigError(
        f"unknown cluster {name!r}{hint}; known in {directory}: {', '.join(known) or 'none'}"
    )


def load_profile(path: Path) -> LoadedProfile:
    """Parse, merge ``extends:`` chains and validate one profile file."""
    data, origin = _load_merged(Path(path), chain=())
    try:
        profile = ClusterProfile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, origin, Path(path), ClusterProfile)) from None
    return LoadedProfile(Path(path).stem, Path(path), profile, origin)


def resolve(loaded: LoadedProfile, stage: Stage, overrides: dict[str, Any]) -> RunConfig:
    """The run config of ``stage`` on this profile, with ``--set`` overrides applied."""
    try:
        return resolve_run(loaded.profile, loaded.name, stage, overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = _error_key(error)
        if _is_overridden(key, overrides):
            where = "--set"
        elif len(key) > 1 and _is_overridden(key[:-1], overrides):
            # A check across the section's keys, one of them from --set: name both.
            where = f"--set (with {loaded.locate(_profile_key(key, stage))})"
        else:
            where = loaded.locate(_profile_key(key, stage))
        raise ConfigError(f"{where}: {'.'.join(key)}: {_error_message(error, RunConfig)}") from None


# What `m2d launch --resume RUN --set ...` may change: where the run trains, not what.
RESIZABLE = ("workers", "deepspeed.gradient_accumulation", "deepspeed.micro_batch_per_gpu")


def resize(run: RunConfig, assignments: list[str] | tuple[str, ...]) -> RunConfig:
    """``run`` continued on other workers (``workers.*`` from ``--set``): the recipe,
    global batch included, stays the run's, so ``deepspeed.gradient_accumulation`` follows
    the number of workers unless it is set too."""
    overrides = parse_overrides(assignments)
    for assignment in assignments:
        dotted = assignment.partition("=")[0]
        if not any(dotted == key or dotted.startswith(f"{key}.") for key in RESIZABLE):
            raise ConfigError(
                f"--set {assignment}: --resume changes only where the run trains "
                f"({', '.join(f'{k}.*' if k == 'workers' else k for k in RESIZABLE)}); "
                "the rest is the run's own - start a new run to change it"
            )
    data = deep_merge(run.model_dump(mode="json"), overrides)
    ds, workers = data["deepspeed"], data["workers"]
    sizes = (ds["micro_batch_per_gpu"], workers["num_workers"])
    # Sizes that are not positive numbers are left to the validation below, which names them.
    if "gradient_accumulation" not in overrides.get("deepspeed", {}) and all(
        type(size) is int and size > 0 for size in sizes
    ):
        per_step = sizes[0] * sizes[1]
        if run.recipe.global_batch % per_step:
            raise ConfigError(
                f"--set workers.num_workers={workers['num_workers']}: the run's global batch "
                f"{run.recipe.global_batch} is not a whole number of steps of "
                f"{ds['micro_batch_per_gpu']} sample(s) on each of {workers['num_workers']} "
                f"workers; pick a number of workers that divides "
                f"{run.recipe.global_batch // ds['micro_batch_per_gpu']}"
            )
        ds["gradient_accumulation"] = run.recipe.global_batch // per_step
    return _validated_run(data)


#: What a relaunch on another cluster keeps of the run: what it trains, on what, from what.
RUN_OWN = ("recipe", "model", "data", "init_from")


def relaunched(
    run: RunConfig, other: RunConfig | None, assignments: list[str] | tuple[str, ...]
) -> RunConfig:
    """A new run like ``run`` (``m2d relaunch``): all of it, or with ``other`` (the same
    stage resolved on another cluster) that cluster's workers, DeepSpeed, Ray, storage,
    tracking and runtime with ``run``'s recipe, model, data and init_from; then the
    ``--set`` assignments (run-level keys, as ``m2d launch --set`` takes them)."""
    data = run.model_dump(mode="json")
    overrides = parse_overrides(assignments)
    if other is not None:
        data = {**other.model_dump(mode="json"), **{key: data[key] for key in RUN_OWN}}
        if "gradient_accumulation" not in overrides.get("deepspeed", {}):
            # The run's global batch on this cluster's workers, where it divides evenly
            # (else the validation below names what to set).
            per_step = data["deepspeed"]["micro_batch_per_gpu"] * data["workers"]["num_workers"]
            batch = overrides.get("recipe", {}).get("global_batch", run.recipe.global_batch)
            if isinstance(batch, int) and batch % per_step == 0:
                data["deepspeed"]["gradient_accumulation"] = batch // per_step
    data = deep_merge(data, overrides)
    return _validated_run(data)


def _validated_run(data: dict[str, Any]) -> RunConfig:
    """``data`` as a RunConfig; a ConfigError naming the ``--set`` key that is wrong."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(_error_key(error))
        raise ConfigError(f"--set: {key}: {_error_message(error, RunConfig)}") from None


def parse_overrides(assignments: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["recipe.steps=10", ...]`` as a nested dict; unknown keys are refused by name."""
    overrides: dict[str, Any] = {}
    for assignment in assignments:
        dotted, sep, raw = assignment.partition("=")
        if not sep or not dotted:
            raise ConfigError(f"--set {assignment!r}: expected KEY.PATH=VALUE")
        key = tuple(dotted.split("."))
        _check_known(key, assignment)
        value = safe_yaml.value(raw, f"--set {dotted}")
        nested: Any = value
        for part in reversed(key):
            nested = {part: nested}
        overrides = deep_merge(overrides, nested)
    return overrides


def _check_known(key: KeyPath, assignment: str) -> None:
    model: Any = RunConfig
    for depth, part in enumerate(key):
        child = _child(model, part)
        if child is None:
            parent = ".".join(key[:depth]) or "the run config"
            hint = _did_you_mean(part, list(_model_fields(model)))
            raise ConfigError(f"--set {assignment}: {parent} has no key {part!r}{hint}")
        model = child


def _child(model: Any, part: str) -> Any:
    """The type under key ``part`` of a model or ``dict[...]`` type; None if it has none."""
    if get_origin(model) is dict:
        return get_args(model)[1]
    return _model_fields(model).get(part)


def _model_fields(model: Any) -> dict[str, Any]:
    if isinstance(model, type) and issubclass(model, BaseModel):
        return {name: info.annotation for name, info in model.model_fields.items()}
    return {}


def _load_merged(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], dict]:
    data, lines = _read_yaml(path)
    origin = {key: (path, line) for key, line in lines.items()}
    parent_name = data.pop("extends", None)
    if parent_name is None:
        return data, origin
    where = f"{path}:{lines[('extends',)]}: extends"
    if not isinstance(parent_name, str):
        raise ConfigError(f"{where}: must be the name of another profile")
    parent = _parent_path(path, parent_name)
    if parent.resolve() in chain or parent.resolve() == path.resolve():
        raise ConfigError(f"{where}: {parent_name!r} extends back to this file (a cycle)")
    if not parent.is_file():
        raise ConfigError(f"{where}: no profile {parent_name!r} at {parent}")
    parent_data, parent_origin = _load_merged(parent, (*chain, path.resolve()))
    return deep_merge(parent_data, data), {**parent_origin, **origin}


def _parent_path(path: Path, name: str) -> Path:
    if name.endswith((".yaml", ".yml")) or "/" in name:
        return path.parent / name
    return path.parent / f"{name}.yaml"


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    data, node = safe_yaml.compose(safe_yaml.read_text(path), str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: a profile is a mapping of keys (ray:, workers:, ...)")
    lines: dict[KeyPath, int] = {}
    _collect_lines(node, (), lines, path)
    return data, lines


def _collect_lines(node: yaml.Node, prefix: KeyPath, lines: dict[KeyPath, int], path: Path):
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, str(key_node.value))
            if key in lines:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"{path}:{line}: {'.'.join(key)}: duplicate key")
            lines[key] = key_node.start_mark.line + 1
            _collect_lines(value_node, key, lines, path)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*prefix, str(index))] = item.start_mark.line + 1
            _collect_lines(item, (*prefix, str(index)), lines, path)


def _explain(exc: ValidationError, origin: dict, path: Path, model: type[BaseModel]) -> str:
    errors = exc.errors()
    key = _error_key(errors[0])
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    message = _error_message(errors[0], model)
    return f"{_locate(key, origin, path)}: {'.'.join(key) or '(top)'}: {message}{more}"


def _error_key(error: dict[str, Any]) -> KeyPath:
    key = tuple(str(part) for part in error["loc"] if part != "[key]")
    problem = (error.get("ctx") or {}).get("error")
    if isinstance(problem, KeyProblem):
        key += tuple(problem.key.split("."))
    return key


def _error_message(error: dict[str, Any], model: type[BaseModel]) -> str:
    problem = (error.get("ctx") or {}).get("error")
    if isinstance(problem, ValueError):
        return str(problem)
    key = tuple(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key{_did_you_mean(key[-1], _allowed_keys(model, key[:-1]))}"
    if error["type"] == "missing":
        return "required key is missing"
    return f"{error['msg']} (got {error['input']!r})"


def _allowed_keys(model: Any, key: KeyPath) -> list[str]:
    for part in key:
        model = _child(model, part)
    return list(_model_fields(model))


def _locate(key: KeyPath, origin: dict[KeyPath, tuple[Path, int]], default: Path) -> str:
    for end in range(len(key), 0, -1):
        if key[:end] in origin:
            path, line = origin[key[:end]]
            return f"{path}:{line}"
    return f"{default}:1"


def _profile_key(run_key: KeyPath, stage: Stage) -> KeyPath:
    """Where a run-config key is written in a profile (recipe keys live under stages)."""
    if run_key[:1] == ("recipe",):
        return ("stages", stage, *run_key[1:])
    return run_key


def _is_overridden(key: KeyPath, overrides: dict[str, Any]) -> bool:
    node: Any = overrides
    for part in key:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
