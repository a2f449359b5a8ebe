"""Training manifests: pre-training clip tables and SFT shot groups, local or on S3, read
by the training loader and the data jobs alike (``m2d data inspect`` counts what one holds:
``datajobs.inspect_manifest``).

Pre-training (CSV, JSONL or Parquet): one row per single-scene clip with
``path, caption, num_frames, fps, width, height`` and optional ``start, end`` seconds
for clips cut from longer files (Panda-70M style); ``num_frames`` counts the frames of
the clip (of the cut, when it has one). SFT (JSON list or JSONL): one group of ordered
shots per entry, ``{"id": ..., "shots": [{<the same columns>}, ...]}``.

Paths are relative to the manifest's folder, absolute, or URIs. Unusable rows are
skipped and counted by reason; a manifest that cannot be read at all is a DataError.
"""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from infra.config import StorageConfig
from infra.errors import DataError, first_line
from infra.storage import filesystem, parent_folder, relative_to, resolve_relative

REQUIRED = ("path", "caption", "num_frames", "fps", "width", "height")


@dataclass(frozen=True)
class Clip:
    """One single-scene clip: a whole file, or the ``start``..``end`` seconds of one."""

    path: str
    caption: str
    num_frames: int
    fps: float
    width: int
    height: int
    start: float | None = None
    end: float | None = None


@dataclass(frozen=True)
class ShotGroup:
    """Ordered shots of one source video (SFT); consecutive shots make a story."""

    id: str
    shots: tuple[Clip, ...]


class SkipCounts:
    """How many rows, stories or files were skipped, by reason."""

    def __init__(self, counts: dict[str, int] | None = None) -> None:
        self._counts: Counter[str] = Counter(counts or {})

    def add(self, reason: str, count: int = 1) -> None:
        """Count ``count`` more skips for ``reason``."""
        self._counts[reason] += count

    def merge(self, other: SkipCounts) -> SkipCounts:
        """A new tally with the counts of both (neither input changes)."""
        return SkipCounts(self._counts + other._counts)

    def as_dict(self) -> dict[str, int]:
        """Reason -> count, sorted by reason (JSON-serialisable)."""
        return dict(sorted(self._counts.items()))

    @property
    def total(self) -> int:
        """All skips together."""
        return sum(self._counts.values())

    def __getitem__(self, reason: str) -> int:
        return self._counts[reason]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SkipCounts) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return f"SkipCounts({self.as_dict()})"

    def __str__(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.as_dict().items()) or "none"


class _BadRow(Exception):
    """A manifest row that cannot be used; ``args[0]`` is the skip reason."""


def read_clips(uri: str, storage: StorageConfig | None = None) -> tuple[list[Clip], SkipCounts]:
    """Clips of a pre-training manifest (CSV, JSONL or Parquet) and the rows skipped."""
    rows, columns = read_table(uri, storage)
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise DataError(
            f"{uri}: missing required column(s) {', '.join(missing)}; "
            f"a pre-training manifest needs {', '.join(REQUIRED)}"
        )
    base, clips, skips = parent_folder(uri), [], SkipCounts()
    for row in rows:
        try:
            clips.append(_clip(row, base))
        except _BadRow as bad:
            skips.add(bad.args[0])
    if not clips:
        raise DataError(f"{uri}: no usable rows (skipped: {skips}); fix the manifest")
    return clips, skips


def read_shot_groups(
    uri: str, num_scenes: int, storage: StorageConfig | None = None
) -> tuple[list[ShotGroup], SkipCounts]:
    """Shot groups of an SFT manifest (JSON or JSONL) with at least ``num_scenes`` shots.

    A bad shot is skipped and splits its group there (the shots on either side are not
    consecutive); parts shorter than ``num_scenes`` are dropped, and a group left with
    none is counted as ``group_too_short``.
    """
    base, groups, skips = parent_folder(uri), [], SkipCounts()
    for number, entry in enumerate(_read_groups(uri, storage)):
        if not isinstance(entry, dict) or not isinstance(entry.get("shots"), list):
            skips.add("bad_group")
            continue
        group_id = str(entry.get("id") or f"group{number}")
        runs = _usable_runs(entry["shots"], base, skips)
        long_runs = [run for run in runs if len(run) >= num_scenes]
        if not long_runs:
            skips.add("group_too_short")
        for part, run in enumerate(long_runs):
            part_id = group_id if len(long_runs) == 1 else f"{group_id}/{part}"
            groups.append(ShotGroup(part_id, tuple(run)))
    if not groups:
        raise DataError(
            f"{uri}: no group has {num_scenes} usable consecutive shots (skipped: {skips}); "
            "fix the manifest or lower the number of scenes"
        )
    return groups, skips


def _usable_runs(shots: list, base: str, skips: SkipCounts) -> list[list[Clip]]:
    runs: list[list[Clip]] = [[]]
    for shot in shots:
        try:
            runs[-1].append(_clip(shot, base))
        except _BadRow as bad:
            skips.add(bad.args[0])
            runs.append([])
    return [run for run in runs if run]


def _clip(row: Any, base: str) -> Clip:
    """A Clip from one manifest row, or _BadRow(reason)."""
    if not isinstance(row, dict):
        raise _BadRow("bad_row")
    path = _text(row.get("path"))
    if not path:
        raise _BadRow("missing_path")
    caption = _text(row.get("caption"))
    if not caption:
        raise _BadRow("empty_caption")
    start, end = _seconds(row, "start"), _seconds(row, "end")
    if start is not None and end is not None and end <= start:
        raise _BadRow("bad_start_end")
    return Clip(
        path=resolve_relative(path, base),
        caption=caption,
        num_frames=_positive(row, "num_frames", int),
        fps=_positive(row, "fps", float),
        width=_positive(row, "width", int),
        height=_positive(row, "height", int),
        start=start,
        end=end,
    )


def clip_record(clip: Clip, base: str) -> dict:
    """The manifest row of ``clip`` (the reader's columns), its path relative to ``base``
    (the written manifest's folder) when it lies under it."""
    record = {
        "path": relative_to(clip.path, base),
        "caption": clip.caption,
        "num_frames": clip.num_frames,
        "fps": clip.fps,
        "width": clip.width,
        "height": clip.height,
    }
    record.update({k: v for k, v in (("start", clip.start), ("end", clip.end)) if v is not None})
    return record


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _number(value: Any, column: str, kind: type) -> float | int | None:
    """``value`` as ``kind``, None when empty; _BadRow(bad_<column>) when not a number."""
    if _text(value) == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _BadRow(f"bad_{column}") from None
    if not math.isfinite(number) or (kind is int and number != int(number)):
        raise _BadRow(f"bad_{column}")
    return int(number) if kind is int else number


def _positive(row: dict, column: str, kind: type) -> float | int:
    number = _number(row.get(column), column, kind)
    if number is None or number <= 0:
        raise _BadRow(f"bad_{column}")
    return number


def _seconds(row: dict, column: str) -> float | None:
    number = _number(row.get(column), column, float)
    if number is not None and number < 0:
        raise _BadRow(f"bad_{column}")
    return number


def _read_bytes(uri: str, storage: StorageConfig | None) -> bytes:
    fs, path = filesystem(uri, storage)
    try:
        if fs.info(path)["type"] != "file":  # a FIFO or device would be read forever
            raise DataError(f"{uri}: not a regular file; give the manifest file")
        return fs.cat_file(path)
    except FileNotFoundError:
        raise DataError(f"{uri}: manifest not found; check the path") from None
    except (IsADirectoryError, OSError) as exc:
        raise DataError(f"{uri}: cannot read the manifest ({exc})") from None


def _suffix(uri: str) -> str:
    return posixpath.splitext(uri.split("?", 1)[0])[1].lower()


def check_new_table(uri: str, storage: StorageConfig | None, what: str) -> None:
    """Refuse, before any work, an output table that is not .csv/.jsonl or already exists."""
    if _suffix(uri) not in (".csv", ".jsonl"):
        raise DataError(f"--out {uri}: name it .csv or .jsonl (a {what})")
    fs, path = filesystem(uri, storage)
    if fs.exists(path):
        raise DataError(f"--out {uri} already exists; remove it or choose another name")


def table_text(records: list[dict], uri: str, columns: tuple[str, ...]) -> str:
    """``records`` as the table ``uri``'s suffix names (CSV with ``columns``, or JSONL):
    what ``read_table`` reads back."""
    if _suffix(uri) == ".jsonl":
        return "".join(json.dumps(record) + "\n" for record in records)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def read_table(uri: str, storage: StorageConfig | None) -> tuple[Iterable[dict], set[str]]:
    """Rows (dicts) and column names of a CSV, JSONL or Parquet table."""
    suffix = _suffix(uri)
    if suffix not in (".csv", ".jsonl", ".ndjson", ".parquet"):
        raise DataError(f"{uri}: unknown manifest format {suffix!r}; use .csv, .jsonl or .parquet")
    data = _read_bytes(uri, storage)
    if suffix == ".parquet":
        return _parquet_rows(data, uri)
    text = _decode(data, uri)
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        return list(reader), set(reader.fieldnames or ())
    rows = list(_json_lines(text))
    return rows, {key for row in rows if isinstance(row, dict) for key in row}


def _parquet_rows(data: bytes, uri: str) -> tuple[list[dict], set[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{uri}: cannot read the Parquet manifest ({exc})") from None
    return table.to_pylist(), set(table.column_names)


def _decode(data: bytes, uri: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{uri}: manifest is not UTF-8 text; write it as UTF-8") from None


def _json_lines(text: str) -> Iterator[Any]:
    """Parsed lines; an unparseable line becomes None (skipped as bad_row)."""
    for line in text.splitlines():
        if line.strip():
            try:
                yield json.loads(line)
            except (ValueError, RecursionError):  # bad JSON, a 5000-digit number, deep nesting
                yield None


def first_row(uri: str, storage: StorageConfig | None = None) -> Any:
    """The first parseable row of a JSON or JSON-lines manifest; None for another format,
    an empty file, or one that is not a list of rows (its reader then says why)."""
    if _suffix(uri) not in (".json", ".jsonl", ".ndjson"):
        return None
    try:
        rows = _read_groups(uri, storage)
    except DataError:
        return None
    return next((row for row in rows if row is not None), None)


def _read_groups(uri: str, storage: StorageConfig | None) -> list[Any]:
    suffix = _suffix(uri)
    if suffix not in (".json", ".jsonl", ".ndjson"):
        raise DataError(f"{uri}: unknown SFT manifest format {suffix!r}; use .json or .jsonl")
    text = _decode(_read_bytes(uri, storage), uri)
    if suffix != ".json":
        return list(_json_lines(text))
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{uri}: not valid JSON ({first_line(exc)}); fix the manifest") from None
    groups = data.get("groups") if isinstance(data, dict) else data
    if not isinstance(groups, list):
        raise DataError(f'{uri}: expected a list of groups (or {{"groups": [...]}})')
    return groups
