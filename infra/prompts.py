"""Prompt files of sampling (batch and validation): one story per JSONL line, checked first.

A line is ``{"id": "story_01", "prompts": ["scene 1", ...], "context_videos": [...]}``;
``context_videos`` (optional) are the first scenes of the story as videos, for extension:
paths relative to the prompts file, absolute paths or URIs. Every problem is a
:class:`DataError` whose one-line message is ``"{file}:{line}: {problem}; {fix}"``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.config import StorageConfig
from infra.errors import DataError
from infra.storage import filesystem, parent_folder, resolve_relative
from infra.video import VideoError, read_frames

__all__ = [
    "EVAL50",
    "Story",
    "check_context_videos",
    "prompt_file",
    "read_stories",
    "truncation_warnings",
]

#: The 50 evaluation stories x 3 scenes shipped with the package (docs/method.md §8).
EVAL50 = str(Path(__file__).with_name("prompt_sets") / "eval50.jsonl")


def _near_miss(uri: str) -> str:
    """The fix for a prompts file that is not there: the shipped set or the file beside it
    whose name is closest (``eval5`` -> ``eval50``), else "check the path"."""
    import difflib

    candidates = {"eval50": "eval50"}  # shipped sets, by the name --prompts takes
    folder = Path(uri).parent
    if "://" not in uri and folder.is_dir():
        candidates.update({p.name: str(p) for p in folder.iterdir() if p.is_file()})
    close = difflib.get_close_matches(Path(uri).name, list(candidates), n=1, cutoff=0.75)
    return f"did you mean {candidates[close[0]]}?" if close else "check the path"


def prompt_file(prompts: str) -> str:
    """The prompt file ``prompts`` names: a shipped set by name (``eval50``), else itself."""
    return EVAL50 if prompts == "eval50" else prompts


_FIELDS = ("id", "prompts", "context_videos")
# The id becomes a folder name in the output tree: no separators, no "." or "..".
_ID = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Story:
    """One story: a prompt per scene, and the videos of its first scenes when extending.

    ``context_videos`` are absolute paths or URIs; ``line`` is the story's line (1-based)
    in its prompts file, for error messages.
    """

    id: str
    prompts: tuple[str, ...]
    context_videos: tuple[str, ...] = ()
    line: int = 0


class _BadLine(Exception):
    """A line that cannot be used; ``args`` are (problem, fix)."""


def read_stories(uri: str, storage: StorageConfig | None = None) -> list[Story]:
    """The stories of the JSONL prompts file at ``uri`` (local path or URI), in file order.

    Raises DataError on the first bad line, naming the file and line number.
    """
    base, stories, first_line = parent_folder(uri), [], {}
    for number, text in _lines(uri, storage):
        try:
            story = _story(_parse(text), number, base)
            if story.id in first_line:
                raise _BadLine(
                    f"duplicate id {story.id!r} (first on line {first_line[story.id]})",
                    "give each story its own id",
                )
        except _BadLine as bad:
            problem, fix = bad.args
            raise DataError(f"{uri}:{number}: {problem}; {fix}") from None
        first_line[story.id] = number
        stories.append(story)
    if not stories:
        raise DataError(f"{uri}: the prompts file has no stories; write one JSON story per line")
    return stories


def _lines(uri: str, storage: StorageConfig | None) -> list[tuple[int, str]]:
    """Non-blank lines of the file with their 1-based numbers."""
    fs, path = filesystem(uri, storage)
    try:
        if fs.info(path)["type"] != "file":  # a FIFO or device would be read forever
            raise DataError(f"{uri}: not a regular file; give the prompts file")
        text = fs.cat_file(path).decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{uri}: prompts file not found; {_near_miss(uri)}") from None
    except UnicodeDecodeError:
        raise DataError(f"{uri}: prompts file is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{uri}: cannot read the prompts file ({exc}); check the path") from None
    return [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _parse(text: str) -> dict[str, Any]:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _BadLine(
            f"invalid JSON ({exc.msg} at column {exc.colno})", "write one JSON object per line"
        ) from None
    except (ValueError, RecursionError):  # a 5000-digit number, 100k nested brackets
        raise _BadLine(
            "a value too large or nested too deeply", "write one story per line"
        ) from None
    if not isinstance(entry, dict):
        raise _BadLine(
            f"a story must be a JSON object, got {type(entry).__name__}",
            'write {"id": ..., "prompts": [...]}',
        )
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise _BadLine(f"unknown field(s) {', '.join(unknown)}", f"use only {', '.join(_FIELDS)}")
    missing = [name for name in _FIELDS[:2] if name not in entry]
    if missing:
        raise _BadLine(f"missing field(s) {', '.join(missing)}", "every story needs id and prompts")
    return entry


def _story(entry: dict[str, Any], line: int, base: str) -> Story:
    prompts = _prompts(entry["prompts"])
    videos = _context_videos(entry.get("context_videos", []), len(prompts))
    return Story(
        id=_id(entry["id"]),
        prompts=prompts,
        context_videos=tuple(resolve_relative(video, base) for video in videos),
        line=line,
    )


def _id(value: Any) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value) or value in (".", ".."):
        raise _BadLine(
            f"id must be a non-empty string of letters, digits, '_', '.', '-', got {value!r}",
            "it names the story's output folder; rename it",
        )
    return value


def _prompts(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _BadLine("prompts must be a non-empty list", "give one prompt per scene")
    for index, prompt in enumerate(value, start=1):
        if not isinstance(prompt, str) or not prompt.strip():
            raise _BadLine(
                f"prompt of scene {index} is empty or not a string ({prompt!r})",
                "give every scene a text prompt",
            )
    return tuple(value)


def _context_videos(value: Any, num_scenes: int) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _BadLine(
            f"context_videos must be a list of video paths, got {value!r}",
            "give paths relative to the prompts file, absolute paths or URIs",
        )
    if len(value) >= num_scenes:
        raise _BadLine(
            f"{len(value)} context video(s) for {num_scenes} prompt(s)",
            "extension needs at least one prompt more than context videos",
        )
    return value


def check_context_videos(
    stories: Sequence[Story],
    storage: StorageConfig | None = None,
    *,
    min_frames: int = 1,
    prompts_uri: str | None = None,
) -> None:
    """Raise DataError if a context video cannot be read or has fewer than ``min_frames``.

    Decodes frame ``min_frames - 1`` of every video, so it costs I/O: call it once, before
    any model loads. The message names the story's line (prefixed with ``prompts_uri``
    when given, as ``read_stories`` does), the scene and the video.
    """
    if min_frames < 1:
        raise ValueError("min_frames must be >= 1")
    for story in stories:
        where = f"{prompts_uri}:{story.line}" if prompts_uri else f"line {story.line}"
        for scene, video in enumerate(story.context_videos, start=1):
            problem = _video_problem(video, storage, min_frames)
            if problem:
                raise DataError(
                    f"{where}: story {story.id} scene {scene}: context video {video} {problem}"
                )


def _video_problem(video: str, storage: StorageConfig | None, min_frames: int) -> str | None:
    """Why ``video`` is unusable (``"<problem>; <fix>"``), or None when it is fine."""
    try:
        read_frames(video, [min_frames - 1], storage)
    except VideoError as exc:
        if exc.reason == "truncated":
            return f"has fewer than {min_frames} frames; give a longer video"
        if exc.reason == "missing":
            return "not found; fix the path (relative paths start at the prompts file)"
        if exc.reason == "zero_byte":
            return "is empty (0 bytes); re-upload it"
        return "cannot be decoded; re-encode it (H.264 mp4)"
    return None


def truncation_warnings(stories: Sequence[Story], tokenizer: Any, text_tokens: int) -> list[str]:
    """One message per prompt longer than ``text_tokens`` tokens (it will be truncated).

    Tokens are counted as the encoder pads and truncates them: ``tokenizer(prompt)``
    with its special tokens (T5's end-of-sequence token counts).
    """
    warnings = []
    for story in stories:
        counts = [len(ids) for ids in tokenizer(list(story.prompts)).input_ids]
        for scene, count in enumerate(counts, start=1):
            if count > text_tokens:
                warnings.append(
                    f"{story.id} scene {scene}: prompt has {count} tokens, "
                    f"truncated to {text_tokens}"
                )
    return warnings
