"""``m2d data inspect MANIFEST`` (``python -m datajobs.inspect_manifest --spec INSPECT_SPEC``):
what a manifest holds and what it skips, read exactly as training reads it
(``trainer.data.manifest``)."""

from __future__ import annotations

import sys

from infra.config import StorageConfig
from infra.job_entry import job_main
from infra.job_specs import InspectSpec
from trainer.data.manifest import read_clips, read_shot_groups


def main(argv: list[str] | None = None) -> int:
    """Counts and skips of ``spec.manifest`` (shot groups of ``spec.scenes``, else clips)."""
    return job_main(InspectSpec, _inspect, argv)


def _inspect(spec: InspectSpec) -> None:
    storage = spec.storage or StorageConfig(root=spec.manifest)
    if spec.scenes:
        groups, skips = read_shot_groups(spec.manifest, spec.scenes, storage)
        shots = sum(len(g.shots) for g in groups)
        print(f"{len(groups)} groups, {shots} shots; skipped: {skips}")
    else:
        clips, skips = read_clips(spec.manifest, storage)
        print(f"{len(clips)} clips; skipped: {skips}")


if __name__ == "__main__":
    sys.exit(main())
