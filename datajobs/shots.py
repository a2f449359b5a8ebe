"""``m2d data shots VIDEOS... --out MANIFEST`` (``python -m datajobs.shots --spec
SHOTS_SPEC``): the shots of long videos, one manifest row each.

Detection. Every frame is decoded once (PyAV on an fsspec file: local or ``s3://``),
scaled to about 256 pixels wide as PySceneDetect's own scene manager does, and given to a
PySceneDetect detector - ``content`` (HSV change between frames against ``--threshold``,
default 27) or ``adaptive`` (that change against its rolling average, default 3.0) - which
proposes cuts. A proposal is kept when the shot really changed across it: detector
proposals within ``FLASH_FRAMES`` of an event's first form one event (a flash makes two,
into it and out of it), and the event is a cut when the hue/saturation histograms of a few frames
before it and a few frames after it differ by at least ``--verify`` (half the L1
distance, 0 to 1; brightness is left out, so a fade is no cut). Of an event that is a cut,
the proposal where the histogram jumps most from one frame to the next is the cut, and of
cuts closer than ``NEAR`` frames, the one with the larger jump. ``--verify 0`` keeps
every proposal. Measured on ``datajobs.cut_synth`` videos (hard cuts; fades, flashes and
fast motion inside shots): ``benchmarks/shot_detection.py``, docs/benchmarks.md.

Shots. Consecutive cuts bound a shot; one shorter than ``--min-shot`` seconds is dropped,
one longer than ``--max-shot`` is cut into windows of that length (a remainder shorter
than ``--min-shot`` dropped); both counted. Each row: ``path, start, end, num_frames,
fps, width, height`` (``trainer.data.manifest``'s columns, captions to come).

The job runs on a Ray Data actor pool (``--num-actors``; the cluster of ``RAY_ADDRESS``
or a small local Ray). Each finished video is saved at once under ``OUT.parts/``: a
rerun of a killed job detects only the rest. A video that cannot be read is counted by
reason and retried by a rerun. The manifest is written last, never over an existing file;
then the parts go.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from infra.config import StorageConfig
from infra.errors import DataError
from infra.job_entry import job_main
from infra.job_specs import ShotsSpec
from infra.ray_runtime import ray_session
from infra.storage import filesystem, is_remote, parent_folder, relative_to, write_file
from infra.video import VideoError, opened_video, video_stream
from trainer.data.manifest import SkipCounts, check_new_table, table_text

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v")
COLUMNS = ("path", "start", "end", "num_frames", "fps", "width", "height")
DEFAULT_THRESHOLDS = {"content": 27.0, "adaptive": 3.0}
#: Detector proposals within this many frames of an event's first are one event (a flash: in, out).
FLASH_FRAMES = 4
#: The histograms compared across an event: frames GAP+1..GAP+3 before and after it.
GAP = 2
HISTOGRAM_BINS = 16
#: Verified cuts this close saw one change (the check's window on either side).
NEAR = GAP + 3 + FLASH_FRAMES
DETECT_WIDTH = 256


# -- detection -----------------------------------------------------------------------------


class CutFinder:
    """The cuts of one video, fed frame by frame (BGR uint8 arrays, in order)."""

    def __init__(self, detector: str, threshold: float | None, fps: float, verify: float) -> None:
        from scenedetect import AdaptiveDetector, ContentDetector, FrameTimecode
        from scenedetect.detector import FlashFilter

        value = DEFAULT_THRESHOLDS[detector] if threshold is None else threshold
        # Two frames: the detector proposes, the check below decides (a flash's pair of
        # proposals must both reach it; the user's minimum applies to the shots).
        if detector == "content":
            mode = FlashFilter.Mode.SUPPRESS
            self._detector = ContentDetector(threshold=value, min_scene_len=2, filter_mode=mode)
        else:
            self._detector = AdaptiveDetector(adaptive_threshold=value, min_scene_len=2)
        self._timecode = lambda index: FrameTimecode(index, fps)
        self._verify = verify
        self._histograms: list[np.ndarray] = []
        self._proposals: list[int] = []

    @property
    def frames(self) -> int:
        return len(self._histograms)

    def add(self, image_bgr: np.ndarray) -> None:
        import cv2

        hsv = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2HSV)
        hue = cv2.calcHist([hsv], [0], None, [HISTOGRAM_BINS], [0, 180]).ravel()
        saturation = cv2.calcHist([hsv], [1], None, [HISTOGRAM_BINS], [0, 256]).ravel()
        pixels = float(image_bgr.shape[0] * image_bgr.shape[1])
        self._histograms.append(np.concatenate([hue, saturation]) / pixels)
        found = self._detector.process_frame(self._timecode(self.frames - 1), image_bgr)
        self._proposals += [timecode.frame_num for timecode in found]

    def cuts(self) -> list[int]:
        """The first frame of every shot after the first."""
        if not self.frames:
            return []
        last = self._detector.post_process(self._timecode(self.frames - 1))
        proposals = sorted({*self._proposals, *(t.frame_num for t in last)} - {0})
        if not self._verify:
            return proposals
        cuts = [
            max(event, key=self._jump)
            for event in _events(proposals)
            if self._change(event[0], event[-1]) >= self._verify
        ]
        # Cuts closer than the frames the check compares saw the same change: the one
        # with the larger jump from one frame to the next is it.
        kept: list[int] = []
        for cut in sorted(cuts, key=self._jump, reverse=True):
            if all(abs(cut - other) > NEAR for other in kept):
                kept.append(cut)
        return sorted(kept)

    def _jump(self, cut: int) -> float:
        """The histogram change from frame ``cut - 1`` to frame ``cut``."""
        return float(np.abs(self._histograms[cut - 1] - self._histograms[cut]).sum() / 2)

    def _change(self, first: int, last: int) -> float:
        """Half the L1 distance of the mean histograms before ``first`` and after ``last``."""
        before = self._histograms[max(0, first - GAP - 2) : max(1, first - GAP + 1)]
        after_start = min(self.frames - 1, last + GAP)
        after = self._histograms[after_start : after_start + 3]
        return float(np.abs(np.mean(before, axis=0) - np.mean(after, axis=0)).sum() / 2)


def _events(proposals: list[int]) -> Iterator[list[int]]:
    event: list[int] = []
    for cut in proposals:
        if event and cut - event[0] > FLASH_FRAMES:
            yield event
            event = []
        event.append(cut)
    if event:
        yield event


@dataclass
class VideoShots:
    """A video's detection: its stream's facts and its cuts (a part file)."""

    video: str
    fps: float
    width: int
    height: int
    frames: int
    cuts: list[int] = field(default_factory=list)


def detect(uri: str, spec: ShotsSpec, storage: StorageConfig | None) -> VideoShots:
    """Decode ``uri`` once and find its cuts. Raises VideoError (with its reason)."""
    from av.video.reformatter import VideoReformatter

    with opened_video(uri, storage) as container:
        stream = video_stream(container, uri)
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        width, height = stream.codec_context.width, stream.codec_context.height
        if not fps or not width:
            raise VideoError(f"{uri}: no frame rate or size in the stream; re-encode it")
        finder = CutFinder(spec.detector, spec.threshold, fps, spec.verify)
        # FFmpeg scales and converts in one pass (cheaper than converting, then resizing).
        scale = min(1.0, DETECT_WIDTH / width)
        small = {"width": max(2, round(width * scale)), "height": max(2, round(height * scale))}
        to_bgr = VideoReformatter()
        for frame in container.decode(stream):
            image = to_bgr.reformat(frame, format="bgr24", interpolation="AREA", **small)
            finder.add(image.to_ndarray())
    if not finder.frames:
        raise VideoError(f"{uri}: no frame decoded")
    return VideoShots(uri, fps, width, height, finder.frames, finder.cuts())


# -- shots ---------------------------------------------------------------------------------


def shot_rows(
    found: VideoShots, min_shot: float, max_shot: float | None, skips: SkipCounts
) -> list[dict]:
    """Manifest rows of a video's shots (windows of long ones), in order."""
    bounds = [0, *found.cuts, found.frames]
    shortest = max(1, round(min_shot * found.fps))
    longest = round(max_shot * found.fps) if max_shot else None
    rows = []
    for first, end in itertools.pairwise(bounds):
        if end - first < shortest:
            skips.add("shot_too_short")
            continue
        pieces = [(first, end)]
        if longest and end - first > longest:
            pieces = [(s, min(s + longest, end)) for s in range(first, end, longest)]
            if pieces[-1][1] - pieces[-1][0] < shortest:
                pieces.pop()
                skips.add("window_remainder_too_short")
        rows += [_row(found, a, b) for a, b in pieces]
    return rows


def _row(found: VideoShots, first: int, end: int) -> dict:
    return {
        "path": found.video,
        "start": round(first / found.fps, 6),
        "end": round(end / found.fps, 6),
        "num_frames": end - first,
        "fps": found.fps,
        "width": found.width,
        "height": found.height,
    }


# -- the job -------------------------------------------------------------------------------


class ShotDetector:
    """Ray Data callable class: one video per row, detected, saved as a part at once."""

    def __init__(self, spec: ShotsSpec, storage: StorageConfig | None) -> None:
        self.spec, self.storage = spec, storage

    def __call__(self, row: dict) -> dict:
        try:
            found = detect(row["video"], self.spec, self.storage)
        except VideoError as exc:
            return {"video": row["video"], "reason": exc.reason, "shots": ""}
        shots = json.dumps(asdict(found))
        write_file(part_uri(self.spec.out, row["video"]), shots, self.storage)
        return {"video": row["video"], "reason": "", "shots": shots}


def part_uri(out: str, video: str) -> str:
    return f"{out}.parts/{hashlib.sha1(video.encode()).hexdigest()[:20]}.json"


def list_videos(sources: Iterable[str], storage: StorageConfig | None) -> list[str]:
    """Every video named: files as given, folders and prefixes searched (by suffix)."""
    videos: list[str] = []
    for source in sources:
        fs, path = filesystem(source, storage)
        if source.lower().endswith(VIDEO_SUFFIXES):
            videos.append(source)
            continue
        if not fs.isdir(path):
            raise DataError(f"{source}: neither a video ({', '.join(VIDEO_SUFFIXES)}) nor a folder")
        found = sorted(p for p in fs.find(path) if p.lower().endswith(VIDEO_SUFFIXES))
        if not found:
            raise DataError(f"{source}: no videos in it ({', '.join(VIDEO_SUFFIXES)})")
        scheme = source.split("://", 1)[0] + "://" if is_remote(source) else ""
        videos += [scheme + p for p in found]
    return list(dict.fromkeys(videos))


@dataclass
class Result:
    """What the job did: the rows, and how many videos it detected, resumed and could not read."""

    rows: list[dict]
    detected: int
    resumed: int
    unreadable: int
    skips: SkipCounts

    def summary(self) -> str:
        return (
            f"{len(self.rows)} shots from {self.detected + self.resumed} videos "
            f"({self.detected} detected now, {self.resumed} by an earlier run, "
            f"{self.unreadable} unreadable); skipped: {self.skips}"
        )


def check_spec(spec: ShotsSpec, storage: StorageConfig | None) -> None:
    check_new_table(spec.out, storage, "shot manifest")
    if spec.max_shot is not None and spec.max_shot < spec.min_shot:
        raise DataError(f"--max-shot {spec.max_shot:g} is below --min-shot {spec.min_shot:g}")


def run(spec: ShotsSpec, storage: StorageConfig | None) -> Result:
    check_spec(spec, storage)
    videos = list_videos(spec.videos, storage)
    done = {video: _read_part(part_uri(spec.out, video), storage) for video in videos}
    todo = [video for video, found in done.items() if found is None]
    skips, detected = SkipCounts(), 0
    for row in _detect_on_ray(todo, spec, storage) if todo else []:
        if row["reason"]:
            skips.add(f"video_{row['reason']}")
        else:
            done[row["video"]] = VideoShots(**json.loads(row["shots"]))
            detected += 1
    unreadable = skips.total
    rows = [
        row
        for video in videos
        if done[video] is not None
        for row in shot_rows(done[video], spec.min_shot, spec.max_shot, skips)
    ]
    if not rows:
        raise DataError(f"no shot found (skipped: {skips}); check the videos and --min-shot")
    write_file(spec.out, manifest_text(rows, spec.out), storage)
    fs, path = filesystem(spec.out + ".parts", storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    return Result(rows, detected, len(videos) - len(todo), unreadable, skips)


def _detect_on_ray(videos: list[str], spec: ShotsSpec, storage: StorageConfig | None) -> list[dict]:
    import ray

    with ray_session(num_cpus=spec.num_actors + 1, log_to_driver=False):
        ray.data.DataContext.get_current().enable_progress_bars = False
        dataset = ray.data.from_items([{"video": video} for video in videos]).map(
            ShotDetector,
            fn_constructor_kwargs={"spec": spec, "storage": storage},
            compute=ray.data.ActorPoolStrategy(size=spec.num_actors),
            num_cpus=1,
        )
        return list(dataset.iter_rows())


def _read_part(uri: str, storage: StorageConfig | None) -> VideoShots | None:
    fs, path = filesystem(uri, storage)
    try:
        return VideoShots(**json.loads(fs.cat_file(path)))
    except (FileNotFoundError, ValueError, TypeError):  # none yet, or one cut by a kill
        return None


def manifest_text(rows: list[dict], out: str) -> str:
    """The manifest in the format ``out``'s suffix names, paths relative to its folder."""
    base = parent_folder(out)
    return table_text(
        [{**row, "path": relative_to(row["path"], base)} for row in rows], out, COLUMNS
    )


def main(argv: list[str] | None = None) -> int:
    """The job entry point: a ``ShotsSpec`` in, the shot manifest written."""
    return job_main(ShotsSpec, _main, argv)


def _main(spec: ShotsSpec) -> None:
    storage = spec.storage or StorageConfig(root=spec.out)
    result = run(spec, storage)
    print(f"wrote {spec.out}")
    print(result.summary())


if __name__ == "__main__":
    sys.exit(main())
