"""YAML from users, parsed with limits: profiles and ``--set`` values.

``yaml.safe_load`` constructs no Python objects, but it follows aliases wherever they
point: an alias to its own ancestor (``a: &a [*a]``, a self-merging ``<<: *a``) builds a
cycle that every later walk recurses into, nine nested aliases of ten (the "billion
laughs") expand to a billion values, and 5000 nested brackets exhaust the parser's
recursion. Here the document is composed first and its node graph checked - no cycle,
at most ``MAX_DEPTH`` levels, at most ``MAX_NODES`` values with aliases expanded - before
anything is built; every refusal is one ``ConfigError`` line naming where.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from infra.errors import ConfigError

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "compose", "read_text", "value"]

MAX_BYTES = 1 << 20  # a profile is a few kB
MAX_DEPTH = 32  # profiles nest 4 deep
MAX_NODES = 100_000  # values, aliases expanded


def read_text(path: Path) -> str:
    """A profile file's text: a regular file (not a FIFO or device that never ends) of at
    most ``MAX_BYTES``, UTF-8."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: not a regular file; a profile is a YAML file")
        if info.st_size > MAX_BYTES:
            raise ConfigError(
                f"{path}: {info.st_size} bytes; a profile is at most {MAX_BYTES} bytes"
            )
        return path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such profile file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); "
            "save the profile as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None


def compose(text: str, where: str) -> tuple[Any, yaml.Node | None]:
    """The document's data and its node (for line numbers), or a ConfigError naming
    ``where`` (``FILE`` or ``--set KEY``) and the line."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check(node, where)
        return (loader.construct_document(node) if node is not None else None), node
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}:{line}: YAML syntax error: {problem}") from None
    except RecursionError:
        raise ConfigError(
            f"{where}: nested too deeply for a profile (more than {MAX_DEPTH} levels)"
        ) from None
    finally:
        loader.dispose()


def value(raw: str, where: str) -> Any:
    """One ``--set`` value: YAML scalar, list or mapping, with the same limits."""
    try:
        return compose(raw, where)[0] if raw else ""
    except ConfigError as exc:
        message = str(exc).replace(f"{where}:1: ", f"{where}: ", 1)
        raise ConfigError(f"{message}; quote a string that holds YAML characters") from None


def _check(root: yaml.Node, where: str) -> None:
    """No cycle, depth and expanded size within the limits (iterative: no recursion)."""
    count = 0
    stack: list[tuple[yaml.Node, int, tuple[int, ...]]] = [(root, 1, ())]
    while stack:
        node, depth, ancestors = stack.pop()
        count += 1
        line = node.start_mark.line + 1
        if count > MAX_NODES:
            raise ConfigError(
                f"{where}: more than {MAX_NODES} values once its aliases are expanded "
                "(an alias bomb?); write the values out"
            )
        if depth > MAX_DEPTH:
            raise ConfigError(
                f"{where}:{line}: nested more than {MAX_DEPTH} levels deep; a profile nests a few"
            )
        if id(node) in ancestors:
            raise ConfigError(
                f"{where}:{line}: an alias refers to a value that contains it (a cycle); "
                "write the value out"
            )
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            continue
        inner = (*ancestors, id(node))
        stack.extend((child, depth + 1, inner) for child in children)
