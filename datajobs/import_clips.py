"""``m2d data import CLIPS --out MANIFEST`` (``python -m datajobs.import_clips --spec
IMPORT_SPEC``): an existing captioned clip list as a pre-training manifest.

The clip list is Panda-70M's layout (CSV or JSONL), one row per source video:

- ``videoID`` - the video's file is ``VIDEOS/VIDEOID.mp4`` (``--videos``, default the
  list's folder; ``--suffix``), or ``path`` - the file itself (relative to the list's
  folder, absolute, or a URI);
- ``timestamp`` - the clips' ``[start, end]`` pairs (``"0:01:02.500"`` or seconds), a
  list of pairs or one pair; in a CSV, written as Panda-70M writes them
  (``"[['0:00:00.000', '0:00:05.005'], ...]"``);
- ``caption`` - one caption per clip, a list as long as ``timestamp`` (or a string for
  one pair).

Every distinct video is read once for its header (frame rate, size, duration; no frame
decoded) by Ray tasks, ``--concurrency`` at a time - on the cluster of ``RAY_ADDRESS``
(a Ray Jobs entrypoint) or a small local Ray. Each clip becomes one manifest row
(``trainer.data.manifest``: path, caption, num_frames, fps, width, height, start, end).

Nothing is fatal about one row or one video: a row that does not parse, a clip whose
times are empty or reach past its video's end, and every clip of a missing or unreadable
video are skipped and counted by reason (``row_*``, ``clip_*``, ``video_*``), and the
summary names the counts. The manifest is never written over an existing file; when no
clip at all can be imported, nothing is written and the job exits 2 with the counts.
"""

from __future__ import annotations

import ast
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from infra.config import StorageConfig
from infra.errors import DataError
from infra.job_entry import job_main
from infra.job_specs import ImportSpec
from infra.ray_runtime import ray_session
from infra.storage import join, parent_folder, resolve_relative, write_file
from infra.video import VideoError, VideoInfo, probe_video
from trainer.data.manifest import (
    Clip,
    SkipCounts,
    check_new_table,
    clip_record,
    read_table,
    table_text,
)

_CLOCK = re.compile(r"(\d+:){0,2}\d+(\.\d+)?")
COLUMNS = ("path", "caption", "num_frames", "fps", "width", "height", "start", "end")


class _Skip(Exception):
    """A row or clip that cannot be imported; ``args[0]`` is the skip reason."""


@dataclass(frozen=True)
class Listed:
    """One clip as the list gives it: its video's URI, its times and its caption."""

    video: str
    start: float
    end: float
    caption: str


@dataclass
class Imported:
    """What the job made of a clip list."""

    clips: list[Clip] = field(default_factory=list)
    listed: int = 0
    videos: int = 0
    skips: SkipCounts = field(default_factory=SkipCounts)

    def summary(self) -> str:
        return (
            f"imported {len(self.clips)} of {self.listed} listed clips from {self.videos} "
            f"videos; skipped: {self.skips}"
        )


# -- the list ------------------------------------------------------------------------------


def listed_clips(
    rows: list[Any], base: str, videos: str, suffix: str
) -> tuple[list[Listed], SkipCounts]:
    """The clips of every row (``base``: the list's folder), and the rows skipped."""
    clips, skips = [], SkipCounts()
    for row in rows:
        try:
            clips.extend(_row_clips(row, base, videos, suffix))
        except _Skip as skip:
            skips.add(skip.args[0])
    return clips, skips


def _row_clips(row: Any, base: str, videos: str, suffix: str) -> list[Listed]:
    if not isinstance(row, dict):
        raise _Skip("row_unparsable")
    video = _video_uri(row, base, videos, suffix)
    pairs = _literal(row.get("timestamp"))
    captions = _literal(row.get("caption"))
    if _is_pair(pairs):  # one clip: one pair, one caption
        pairs, captions = [pairs], captions if isinstance(captions, list) else [captions]
    if not isinstance(pairs, list) or not pairs or not all(_is_pair(p) for p in pairs):
        raise _Skip("row_bad_timestamp")
    if not isinstance(captions, list) or len(captions) != len(pairs):
        raise _Skip("row_caption_count")
    return [
        Listed(video, _seconds(start), _seconds(end), str(caption).strip())
        for (start, end), caption in zip(pairs, captions, strict=True)
    ]


def _video_uri(row: dict, base: str, videos: str, suffix: str) -> str:
    path = str(row.get("path") or "").strip()
    if path:
        return resolve_relative(path, base)
    video_id = str(row.get("videoID") or "").strip()
    if not video_id or "/" in video_id:
        raise _Skip("row_no_video")
    return join(videos, video_id + suffix)


def _literal(value: Any) -> Any:
    """A list as JSON gives it, or as Panda-70M's CSV writes it (a Python literal)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise _Skip("row_unparsable") from None
    return value


def _is_pair(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, str | int | float) for v in value)
    )


def _seconds(value: str | int | float) -> float:
    """``"H:MM:SS.mmm"``, ``"MM:SS.mmm"`` or seconds, as seconds."""
    if isinstance(value, str):
        if not _CLOCK.fullmatch(value.strip()):
            raise _Skip("row_bad_timestamp")
        seconds = 0.0
        for part in value.strip().split(":"):
            seconds = seconds * 60 + float(part)
        return seconds
    if isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise _Skip("row_bad_timestamp")
    return float(value)


# -- the clips -----------------------------------------------------------------------------


def clips_of(
    listed: list[Listed], infos: dict[str, VideoInfo | str]
) -> tuple[list[Clip], SkipCounts]:
    """Manifest clips from the listed ones and each video's header (or the reason it has
    none); the clips skipped, by reason."""
    clips, skips = [], SkipCounts()
    for item in listed:
        info = infos[item.video]
        if isinstance(info, str):
            skips.add(f"video_{info}")
            continue
        try:
            clips.append(_clip(item, info))
        except _Skip as skip:
            skips.add(skip.args[0])
    return clips, skips


def _clip(item: Listed, info: VideoInfo) -> Clip:
    if not item.caption:
        raise _Skip("clip_no_caption")
    if item.end <= item.start:
        raise _Skip("clip_empty")
    if item.end > info.duration + 1 / info.fps:  # a frame's slack: containers round
        raise _Skip("clip_past_video_end")
    num_frames = math.floor((item.end - item.start) * info.fps + 1e-6)
    if num_frames < 1:
        raise _Skip("clip_empty")
    return Clip(
        path=item.video,
        caption=item.caption,
        num_frames=num_frames,
        fps=info.fps,
        width=info.width,
        height=info.height,
        start=item.start,
        end=item.end,
    )


def probe(row: dict[str, Any], storage: StorageConfig | None) -> dict[str, Any]:
    """One Ray Data row: a video's header, or the reason it cannot be read."""
    try:
        info = probe_video(row["video"], storage)
    except VideoError as exc:
        return {
            "video": row["video"],
            "reason": exc.reason,
            "fps": 0.0,
            "width": 0,
            "height": 0,
            "duration": 0.0,
        }
    return {"video": row["video"], "reason": "", **info.__dict__}


def probe_on_ray(
    videos: list[str], spec: ImportSpec, storage: StorageConfig | None
) -> dict[str, VideoInfo | str]:
    """Each video's header (or its skip reason), read by Ray tasks."""
    import ray.data

    with ray_session(num_cpus=spec.concurrency + 1, log_to_driver=False):
        rows = (
            ray.data.from_items([{"video": video} for video in videos])
            .map(probe, fn_kwargs={"storage": storage}, concurrency=spec.concurrency)
            .take_all()
        )
    return {
        row["video"]: row["reason"]
        or VideoInfo(row["fps"], row["width"], row["height"], row["duration"])
        for row in rows
    }


# -- the job -------------------------------------------------------------------------------


def run(spec: ImportSpec, storage: StorageConfig | None) -> Imported:
    """Read the list, read each video's header, write the manifest."""
    check_new_table(spec.out, storage, "pre-training manifest")
    rows, _ = read_table(spec.clips, storage)
    base = parent_folder(spec.clips)
    videos = resolve_relative(spec.videos, base) if spec.videos else base
    listed, skips = listed_clips(list(rows), base, videos, spec.suffix)
    infos = probe_on_ray(sorted({item.video for item in listed}), spec, storage) if listed else {}
    clips, clip_skips = clips_of(listed, infos)
    result = Imported(clips, len(listed), len(infos), skips.merge(clip_skips))
    if not clips:
        raise DataError(
            f"{spec.clips}: no clip could be imported ({result.summary()}); "
            "check --videos and --suffix, or the list's columns (videoID, timestamp, caption)"
        )
    write_file(spec.out, manifest_text(clips, spec.out), storage)
    return result


def manifest_text(clips: list[Clip], out: str) -> str:
    """The manifest in the format ``out``'s suffix names, paths relative to its folder."""
    base = parent_folder(out)
    return table_text([clip_record(clip, base) for clip in clips], out, COLUMNS)


def main(argv: list[str] | None = None) -> int:
    """The job entry point: an ``ImportSpec`` in, the pre-training manifest written."""
    return job_main(ImportSpec, _main, argv)


def _main(spec: ImportSpec) -> None:
    storage = spec.storage or StorageConfig(root=spec.clips)
    result = run(spec, storage)
    print(f"wrote {spec.out}")
    print(result.summary())


if __name__ == "__main__":
    sys.exit(main())
