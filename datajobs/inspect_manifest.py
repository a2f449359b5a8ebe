"""``m2d data inspect MANIFEST`` (``python -m datajobs.inspect_manifest --spec INSPECT_SPEC``):
what a manifest holds and what it skips, read exactly as training reads it
(``trainer.data.manifest``)."""

from __future__ import annotations

import sys

from infra.config import StorageConfig
from infra.job_entry import job_main
from infra.job_specs import InspectSpec
from trainer.data.manifest import SkipCounts, read_clips, read_shot_groups


def main(argv: list[str] | None = None) -> int:
    """Counts and skips of ``spec.manifest`` (shot groups of ``spec.scenes``, else clips)."""
    return job_main(InspectSpec, _inspect, argv)


#: The paper's SFT groups: three consecutive scenes (docs/method.md §6).
DEFAULT_SCENES = 3


def _inspect(spec: InspectSpec) -> None:
    storage = spec.storage or StorageConfig(root=spec.manifest)
    scenes = spec.scenes
    if scenes is None and holds_groups(spec.manifest, storage):
        scenes = DEFAULT_SCENES
        print(f"an SFT manifest (rows of shots): read as groups of {scenes} scenes (--scenes N)")
    if scenes:
        groups, skips = read_shot_groups(spec.manifest, scenes, storage)
        clips = [shot for group in groups for shot in group.shots]
        print(f"{len(groups)} groups, {len(clips)} shots; skipped: {skips}")
    else:
        clips, skips = read_clips(spec.manifest, storage)
        print(f"{len(clips)} clips; skipped: {skips}")
    if spec.check:
        videos = sorted({(clip.path, clip.start, clip.end) for clip in clips}, key=str)
        found = check_videos(videos, storage)
        print(f"videos checked: {len(videos)}; unusable: {found}")
    elif clips:
        print("videos not opened (--check opens each one)")


def holds_groups(manifest: str, storage: StorageConfig) -> bool:
    """Whether the manifest's first row is an SFT group (it has ``shots``)."""
    from trainer.data.manifest import first_row

    row = first_row(manifest, storage)
    return isinstance(row, dict) and "shots" in row


def check_videos(videos: list[tuple], storage: StorageConfig) -> SkipCounts:
    """Each video's first frame decoded; the unusable ones counted by reason (missing,
    zero_byte, undecodable, ...)."""
    from infra.video import VideoError, read_frames

    unusable = SkipCounts()
    for path, start, end in videos:
        try:
            read_frames(path, [0], storage, start, end)
        except VideoError as exc:
            unusable.add(exc.reason)
    return unusable


if __name__ == "__main__":
    sys.exit(main())
