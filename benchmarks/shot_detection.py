"""Shot detection (``m2d data shots``, ``datajobs.shots``): how right, and how fast.

Right: ``--videos`` synthesized videos (``datajobs.cut_synth``: 8 shots each, hard cuts,
fades, flashes and fast motion inside shots) at 64x96; a found cut counts when it lies
within one frame of a real one. Precision = found cuts that are real / found cuts; recall
= real cuts found / real cuts (issue 30 target: both >= 0.98).

Fast: detection's frames/s against decoding alone with PyAV on the same files, file by
file - decoding every frame to an RGB array (what reading frames costs a pipeline), and
decoding without any conversion (the floor) - at ``--size`` (default 360x640); target
>= 0.8x (detection is not the bottleneck). Detection asks FFmpeg for frames already
scaled to 256 pixels wide, which is why it can beat a full-size RGB conversion.

    python benchmarks/shot_detection.py [--videos 100 --speed-videos 4 --size 360x640]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datajobs.cut_synth import cut_video  # noqa: E402
from datajobs.shots import detect  # noqa: E402
from infra.job_specs import ShotsSpec  # noqa: E402

SPEC = ShotsSpec(videos=["unused"], out="unused.csv")


def accuracy(folder: Path, videos: int) -> tuple[float, float, int]:
    found_total = matched = real = 0
    for seed in range(videos):
        uri = str(folder / f"v{seed}.mp4")
        truth = cut_video(uri, seed)
        found = detect(uri, SPEC, None).cuts
        found_total, real = found_total + len(found), real + len(truth)
        matched += sum(1 for cut in found if any(abs(cut - t) <= 1 for t in truth))
    return matched / found_total, matched / real, real


def decode_only(uri: str, to_rgb: bool) -> int:
    import av

    with av.open(uri) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = 0
        for frame in container.decode(stream):
            if to_rgb:
                frame.to_ndarray(format="rgb24")
            frames += 1
        return frames


def speed(folder: Path, videos: int, size: tuple[int, int]) -> dict[str, float]:
    """Frames/s of each way through the same files, one file at a time."""
    seconds = {"decode to RGB": 0.0, "decode only": 0.0, "detection": 0.0}
    frames = 0
    for seed in range(videos):
        uri = str(folder / f"big{seed}.mp4")
        cut_video(uri, 1000 + seed, size=size)
        for name, run in (
            ("decode to RGB", lambda uri: decode_only(uri, True)),
            ("decode only", lambda uri: decode_only(uri, False)),
            ("detection", lambda uri: detect(uri, SPEC, None)),
        ):
            start = time.perf_counter()
            result = run(uri)
            seconds[name] += time.perf_counter() - start
            frames += result if name == "decode only" else 0
    return {name: frames / spent for name, spent in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=100)
    parser.add_argument("--speed-videos", type=int, default=4)
    parser.add_argument("--size", default="360x640")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as scratch:
        precision, recall, cuts = accuracy(Path(scratch), args.videos)
        print(
            f"{args.videos} videos, {cuts} real cuts: "
            f"precision {precision:.3f}, recall {recall:.3f}"
        )
        rates = speed(Path(scratch), args.speed_videos, (height, width))
    print(
        f"{args.size}: " + ", ".join(f"{name} {rate:.0f} frames/s" for name, rate in rates.items())
    )
    for name in ("decode to RGB", "decode only"):
        print(f"detection / {name} = {rates['detection'] / rates[name]:.2f}x")


if __name__ == "__main__":
    main()
