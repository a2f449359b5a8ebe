"""``m2d data filter --manifest URI --encoder-path URI --out URI`` (``python -m
datajobs.filter --spec FILTER_SPEC``): the inter-scene similarity filter for SFT
manifests (docs/method.md §6).

Every shot of an SFT manifest is embedded with a video encoder (``evaluation.encoders``;
``encoder.num_frames`` frames spread evenly over the shot) by a Ray Data actor pool, one
encoder per actor. Adjacent shots of a group are compared by cosine similarity.

Windows and the output manifest: SFT trains on windows of ``n`` consecutive shots, and
a window is kept when all its ``n - 1`` adjacent similarities are >= the threshold. The
output cannot list windows (the SFT story order draws a window from a group), so each group
is cut wherever an adjacent similarity is below the threshold (or a shot could not be
embedded: that shot is dropped), and the resulting maximal runs with at least ``n``
shots are written as groups. Every window of every output group is then a kept window,
and every kept window of the input lies in exactly one output group: "windows kept"
counts both. A group cut into several runs keeps its id when one run survives, else its
runs get ids ``ID/0``, ``ID/1``... (as the manifest reader names split groups). Each
output group also carries ``similarities`` (its adjacent similarities, for auditing).

Shots are written with the manifest reader's columns (extra columns are not kept) and
their paths relative to the output manifest's folder when the file lies under it,
otherwise as absolute paths or URIs. Bad rows and bad videos are skipped and counted by
the reasons of ``trainer.data.manifest`` and ``infra.video``.

It joins the Ray cluster of ``RAY_ADDRESS`` (a Ray Jobs entrypoint) or starts a small
local Ray; each of the K actors loads one encoder and embeds batches of B shots.

Writes the manifest (never over an existing file), a PNG histogram of all adjacent
similarities with the threshold drawn (default: beside the manifest, ``.png``), and one
summary line; with ``--tracking-uri`` also an MLflow run with the counts and histogram.
Exit status: 0 done, 2 a problem the user can fix (one line on stderr).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import posixpath
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from evaluation.encoders import check_encoder
from infra.config import StorageConfig
from infra.errors import DataError, ServiceError
from infra.job_entry import job_main
from infra.job_specs import FilterSpec
from infra.logging import get_logger
from infra.ray_runtime import ray_session
from infra.storage import filesystem, parent_folder, write_file
from trainer.data.manifest import ShotGroup, SkipCounts, clip_record, read_shot_groups

log = get_logger("data.filter")

MANIFEST_SUFFIXES = (".json", ".jsonl", ".ndjson")


# ---------------------------------------------------------------- window logic (pure)


def kept_runs(
    similarities: Sequence[float | None],
    threshold: float,
    num_scenes: int,
    usable: Sequence[bool] | None = None,
) -> list[range]:
    """Maximal runs of shots whose adjacent similarities are all >= ``threshold``.

    ``similarities[i]`` compares shots ``i`` and ``i + 1`` (None: not comparable);
    ``usable[i]`` False drops shot ``i``. Only runs of >= ``num_scenes`` shots are kept.
    """
    count = len(similarities) + 1
    usable = [True] * count if usable is None else list(usable)
    if len(usable) != count:
        raise ValueError("usable needs one entry per shot: len(similarities) + 1")
    runs, start = [], None
    for shot in range(count):
        linked = shot > 0 and _passes(similarities[shot - 1], threshold)
        if start is not None and not (usable[shot] and linked):
            runs.append(range(start, shot))
            start = None
        if start is None and usable[shot]:
            start = shot
    if start is not None:
        runs.append(range(start, count))
    return [run for run in runs if len(run) >= num_scenes]


def _passes(similarity: float | None, threshold: float) -> bool:
    return similarity is not None and not math.isnan(similarity) and similarity >= threshold


def window_count(length: int, num_scenes: int) -> int:
    """Windows of ``num_scenes`` consecutive shots in a run of ``length`` shots."""
    return max(length - num_scenes + 1, 0)


def adjacent_similarities(embeddings: Sequence) -> list[float | None]:
    """Cosine similarity of each shot's embedding with the next one (None if either is)."""
    import torch.nn.functional as F

    pairs = itertools.pairwise(embeddings)
    return [
        None if a is None or b is None else float(F.cosine_similarity(a, b, dim=0))
        for a, b in pairs
    ]


# ---------------------------------------------------------------- embedding (Ray actors)


class ShotEmbedder:
    """Ray Data callable class: one encoder per actor; a batch of shots -> embeddings.

    Output columns: ``key`` (as given), ``embedding`` (float32 bytes, empty when the shot
    was skipped) and ``reason`` (the skip reason, empty when embedded).
    """

    def __init__(self, encoder: str, encoder_path: str, storage: StorageConfig | None) -> None:
        from evaluation.encoders import load_encoder

        self.storage = storage
        self.encoder = load_encoder(encoder, encoder_path, storage)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        embeddings, reasons = [], []
        for row in zip(*(batch[name] for name in ("path", "frames", "start", "end")), strict=True):
            embedding, reason = self._embed(*row)
            embeddings.append(embedding)
            reasons.append(reason)
        return {
            "key": batch["key"],
            "embedding": np.array(embeddings, dtype=object),
            "reason": np.array(reasons, dtype=object),
        }

    def _embed(self, path: str, frames: int, start: float, end: float) -> tuple[bytes, str]:
        from evaluation.encoders import uniform_frame_indices
        from infra.video import VideoError, read_frames

        try:
            indices = uniform_frame_indices(int(frames), self.encoder.num_frames)
        except DataError:
            return b"", "too_short"
        cut = {"start": _optional(start), "end": _optional(end)}
        try:
            frames_THWC = read_frames(str(path), indices, self.storage, **cut)
        except VideoError as exc:
            log.warning("skipped shot %s: %s", path, exc)
            return b"", exc.reason
        embedding = self.encoder.embed(frames_THWC.permute(0, 3, 1, 2))
        return embedding.numpy().astype("float32").tobytes(), ""


def _optional(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def shot_rows(groups: Sequence[ShotGroup], min_frames: int) -> list[dict]:
    """One Ray Data row per shot; shots under ``min_frames`` claim 0 frames (too_short)."""
    from trainer.data.loader import clip_frame_count

    rows = []
    for g, group in enumerate(groups):
        for s, shot in enumerate(group.shots):
            frames = clip_frame_count(shot)
            rows.append(
                {
                    "key": f"{g}:{s}",
                    "path": shot.path,
                    "frames": frames if frames >= min_frames else 0,
                    "start": math.nan if shot.start is None else shot.start,
                    "end": math.nan if shot.end is None else shot.end,
                }
            )
    return rows


def embed_shots(
    rows: list[dict], spec: FilterSpec, storage: StorageConfig | None
) -> dict[str, tuple[bytes, str]]:
    """key -> (embedding bytes, skip reason), from an actor pool of ``spec.num_actors``."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = ray.data.from_items(rows).map_batches(
        ShotEmbedder,
        fn_constructor_kwargs={
            "encoder": spec.encoder,
            "encoder_path": spec.encoder_path,
            "storage": storage,
        },
        compute=ray.data.ActorPoolStrategy(size=spec.num_actors),
        batch_size=spec.batch_size,
        batch_format="numpy",
        num_cpus=1,
    )
    return {row["key"]: (row["embedding"], row["reason"]) for row in dataset.iter_rows()}


# ---------------------------------------------------------------- the job


@dataclass
class Result:
    """What the filter did: the output groups, all similarities, and the counts."""

    groups: list[dict]
    similarities: list[float]
    counts: dict[str, int]
    skips: SkipCounts = field(default_factory=SkipCounts)

    def summary(self, threshold: float, num_scenes: int) -> str:
        c = self.counts
        return (
            f"groups in {c['groups_in']}, out {c['groups_out']}; windows of {num_scenes} kept "
            f"{c['windows_kept']} of {c['windows_in']} (threshold {threshold:g}); "
            f"shots embedded {c['shots_embedded']} of {c['shots_in']}; skipped: {self.skips}"
        )


def filter_groups(
    groups: Sequence[ShotGroup],
    embedded: dict[str, tuple[bytes, str]],
    threshold: float,
    num_scenes: int,
) -> Result:
    """Cut groups into kept runs from per-shot embeddings (``embed_shots`` output)."""
    import numpy as np
    import torch

    out, similarities, skips = [], [], SkipCounts()
    counts = dict.fromkeys(("groups_in", "groups_out", "windows_in", "windows_kept"), 0)
    counts.update(groups_in=len(groups), shots_in=0, shots_embedded=0)
    for g, group in enumerate(groups):
        embeddings = []
        for s in range(len(group.shots)):
            data, reason = embedded[f"{g}:{s}"]
            if reason:
                skips.add(reason)
            vector = np.frombuffer(data, dtype=np.float32) if not reason else None
            embeddings.append(None if vector is None else torch.from_numpy(vector.copy()))
        sims = adjacent_similarities(embeddings)
        similarities += [value for value in sims if value is not None]
        usable = [e is not None for e in embeddings]
        runs = kept_runs(sims, threshold, num_scenes, usable)
        out += _output_groups(group, runs, sims)
        counts["shots_in"] += len(group.shots)
        counts["shots_embedded"] += sum(usable)
        counts["windows_in"] += window_count(len(group.shots), num_scenes)
        counts["windows_kept"] += sum(window_count(len(run), num_scenes) for run in runs)
    counts["groups_out"] = len(out)
    return Result(out, similarities, counts, skips)


def _output_groups(group: ShotGroup, runs: list[range], sims: list) -> list[dict]:
    return [
        {
            "id": group.id if len(runs) == 1 else f"{group.id}/{part}",
            "shots": [group.shots[s] for s in run],
            "similarities": [round(sims[s], 6) for s in run[:-1]],
        }
        for part, run in enumerate(runs)
    ]


def manifest_text(groups: list[dict], out: str) -> str:
    """The output manifest in the format ``out``'s suffix names (JSON list or JSONL)."""
    base = parent_folder(out)
    records = [
        {**group, "shots": [clip_record(shot, base) for shot in group["shots"]]} for group in groups
    ]
    if _suffix(out) == ".json":
        return json.dumps(records, indent=1) + "\n"
    return "".join(json.dumps(record) + "\n" for record in records)


def histogram_png(similarities: list[float], threshold: float, title: str) -> bytes:
    """A PNG histogram of ``similarities`` with the threshold as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    # From the lowest value (or the threshold) rounded down to 0.1, so a narrow spread
    # near 1 still gets readable bins.
    low = max(math.floor(min([threshold, *similarities]) * 10) / 10, -1.0)
    axes.hist(similarities, bins=40, range=(low, 1.0), color="tab:blue")
    axes.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g}")
    axes.set(xlabel="adjacent-scene cosine similarity", ylabel="shot pairs", title=title)
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _suffix(uri: str) -> str:
    return posixpath.splitext(uri)[1].lower()


def default_histogram(out: str) -> str:
    """``.../sft.filtered.jsonl`` -> ``.../sft.filtered.png``."""
    return posixpath.splitext(out)[0] + ".png"


def check_spec(spec: FilterSpec, storage: StorageConfig | None) -> None:
    """Fail before any work on what the user can fix: values, names, existing outputs."""
    if spec.scenes < 1 or spec.num_actors < 1 or spec.batch_size < 1:
        raise DataError("--scenes, --num-actors and --batch-size must be >= 1")
    if not -1.0 <= spec.threshold <= 1.0:
        raise DataError(f"--threshold {spec.threshold:g} is not a cosine similarity in [-1, 1]")
    if _suffix(spec.out) not in MANIFEST_SUFFIXES:
        raise DataError(f"--out {spec.out}: name it .json or .jsonl (an SFT manifest)")
    for uri, what in ((spec.out, "--out"), (spec.histogram, "--histogram")):
        fs, path = filesystem(uri, storage)
        if fs.exists(path):
            raise DataError(f"{what} {uri} already exists; remove it or choose another name")
    check_encoder(spec.encoder, spec.encoder_path, storage)


def run(spec: FilterSpec) -> Result:
    """The whole job: read, embed on Ray, cut groups, write; returns what it did."""
    storage = spec.storage or StorageConfig(root=spec.manifest)
    check_spec(spec, storage)
    groups, read_skips = read_shot_groups(spec.manifest, spec.scenes, storage)
    embedded = _embed_on_ray(shot_rows(groups, spec.min_frames), spec, storage)
    result = filter_groups(groups, embedded, spec.threshold, spec.scenes)
    result.skips = read_skips.merge(result.skips)
    title = (
        f"{len(result.similarities)} adjacent pairs, {result.counts['windows_kept']} windows kept"
    )
    png = histogram_png(result.similarities, spec.threshold, title)
    write_file(spec.histogram, png, storage)
    write_file(spec.out, manifest_text(result.groups, spec.out).encode(), storage)
    if spec.tracking_uri:
        _track(spec, result, png)
    return result


def _embed_on_ray(
    rows: list[dict], spec: FilterSpec, storage: StorageConfig | None
) -> dict[str, tuple[bytes, str]]:
    with ray_session(num_cpus=spec.num_actors + 1, log_to_driver=False):
        return embed_shots(rows, spec, storage)


def _track(spec: FilterSpec, result: Result, png: bytes) -> None:
    """One MLflow run with the job's params, counts (metrics) and histogram (artifact)."""
    from mlflow.exceptions import MlflowException

    try:
        _log_run(spec, result, png)
    except (MlflowException, OSError) as exc:
        raise ServiceError(
            f"MLflow at {spec.tracking_uri}: cannot log the run ({exc}); "
            f"{spec.out} and {spec.histogram} are written"
        ) from None


def _log_run(spec: FilterSpec, result: Result, png: bytes) -> None:
    import tempfile

    from infra.config import TrackingConfig
    from infra.tracking import Tracker, flatten

    params = spec.model_dump(exclude={"tracking_uri", "experiment"})
    tracker = Tracker.start(
        TrackingConfig(uri=spec.tracking_uri, experiment=spec.experiment),
        "data-filter",
        tags={"stage": "filter"},
        params=flatten(params),
    )
    skips = {f"skipped.{reason}": n for reason, n in result.skips.as_dict().items()}
    tracker.log_metrics({**result.counts, **skips, "skipped": result.skips.total}, step=0)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "similarities.png")
        with open(path, "wb") as handle:
            handle.write(png)
        tracker.client.log_artifact(tracker.run_id, path)
    tracker.finish()


def main(argv: list[str] | None = None) -> int:
    """The job entry point: a ``FilterSpec`` in, the filtered manifest written."""
    return job_main(FilterSpec, _main, argv)


def _main(spec: FilterSpec) -> None:
    if spec.histogram is None:
        spec = spec.model_copy(update={"histogram": default_histogram(spec.out)})
    result = run(spec)
    print(f"wrote {spec.out} and {spec.histogram}")
    print(result.summary(spec.threshold, spec.scenes))


if __name__ == "__main__":
    sys.exit(main())
