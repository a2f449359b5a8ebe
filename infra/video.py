"""Video I/O shared by the trainer and the sampler: frame sampling, decode, resize, write.

Decoding uses PyAV on an fsspec file object, so local paths and ``s3://`` URIs read the
same way, and seeks to a keyframe before the first wanted frame instead of decoding the
whole file. Shape legend: T frames, H height, W width, C = 3 RGB channels; ``_THWC``
is what decoders produce, ``_TCHW`` is what models take.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np
import torch
import torch.nn.functional as F
from av.video.reformatter import VideoReformatter

from infra.config import StorageConfig
from infra.errors import DataError
from infra.storage import filesystem, is_remote

# Object-store read block: big enough for a GOP of a 480p clip, small enough that
# reading the index at the end of an mp4 does not fetch the whole object.
_REMOTE_BLOCK_SIZE = 4 * 2**20


class VideoError(DataError):
    """A video cannot be used; ``reason`` is a short key for skip counts.

    Reasons: ``missing``, ``zero_byte``, ``undecodable``, ``truncated``, ``too_short``.
    """

    def __init__(self, message: str, reason: str = "undecodable") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        # Keep the reason when the error crosses a Ray process boundary.
        return (type(self), (self.args[0], self.reason))


def sample_frame_indices(
    total_frames: int,
    num_frames: int = 49,
    max_stride: int = 3,
    span: tuple[float, float] | None = (0.05, 0.95),
    rng: random.Random | None = None,
) -> list[int]:
    """Indices of ``num_frames`` frames at the largest stride <= ``max_stride`` that fits.

    ``span`` limits sampling to a fraction of the clip (pre-training: 5%..95%, which skips
    fades and cuts at the ends); ``None`` uses the whole clip (SFT shots). With ``rng`` the
    start is drawn among all valid starts, otherwise the window is centered.
    """
    if num_frames < 1 or max_stride < 1:
        raise ValueError("num_frames and max_stride must be >= 1")
    low, high = _span_bounds(total_frames, span)
    for stride in range(max_stride, 0, -1):
        needed = (num_frames - 1) * stride + 1
        slack = high - low - needed
        if slack >= 0:
            start = low + (rng.randint(0, slack) if rng is not None else slack // 2)
            return list(range(start, start + needed, stride))
    raise VideoError(
        f"clip too short: {num_frames} frames need {num_frames} usable frames, "
        f"the clip has {max(high - low, 0)} in frames [{low}, {high}) of {total_frames}",
        reason="too_short",
    )


def _span_bounds(total_frames: int, span: tuple[float, float] | None) -> tuple[int, int]:
    """Half-open frame range [low, high) covered by ``span``."""
    if span is None:
        return 0, max(total_frames, 0)
    # Round first so 200 * 0.05 = 10.000000000000002 still starts at frame 10.
    low = math.ceil(round(total_frames * span[0], 6))
    high = math.floor(round(total_frames * span[1], 6))
    return low, high


def cover_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """Smallest (height, width) with the source aspect that covers the target size."""
    scale = max(target_height / height, target_width / width)
    return max(target_height, round(height * scale)), max(target_width, round(width * scale))


def resize_center_crop(frames_THWC_uint8: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale frames to cover ``height`` x ``width``, then center-crop; uint8 (T, 3, H, W).

    At 1080x1920 -> 480x720 this is docs/method.md §6's "resize the short side to 480, center-crop";
    for any aspect it keeps the whole target covered. Bilinear with antialias, so
    downscaling does not alias.
    """
    frames_TCHW = frames_THWC_uint8.permute(0, 3, 1, 2)
    source_h, source_w = frames_TCHW.shape[-2:]
    new_h, new_w = cover_size(source_h, source_w, height, width)
    if (new_h, new_w) != (source_h, source_w):
        frames_TCHW = _resize(frames_TCHW, new_h, new_w)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return frames_TCHW[:, :, top : top + height, left : left + width].contiguous()


def _resize(frames_TCHW_uint8: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # uint8 in channels-last memory (a permuted THWC decode) takes torch's vectorised
    # uint8 kernel, about 7x faster on CPU than resizing in float and within 1 level of it.
    return F.interpolate(
        frames_TCHW_uint8.contiguous(memory_format=torch.channels_last),
        size=(height, width),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )


def read_frames(
    uri: str,
    indices: list[int],
    storage: StorageConfig | None = None,
    start: float | None = None,
    end: float | None = None,
) -> torch.Tensor:
    """Decode the frames at ``indices``; uint8 (T, H, W, 3) in the order of ``indices``.

    ``start``/``end`` (seconds) cut a clip out of a longer file; indices count from
    ``start``. Raises :class:`VideoError` (a DataError) naming the file and the reason.
    """
    if not indices:
        raise ValueError("read_frames needs at least one frame index")
    with opened_video(uri, storage) as container:
        found = _decode_wanted(container, sorted(set(indices)), start or 0.0, end, uri)
    return torch.from_numpy(np.stack([found[i] for i in indices]))


@contextlib.contextmanager
def opened_video(uri: str, storage: StorageConfig | None = None) -> Iterator[Any]:
    """``uri`` (local or remote) open in PyAV for the block: the file checked first
    (``missing``, ``zero_byte``), and a decoder or I/O failure inside the block raised as
    a :class:`VideoError` naming the file (``undecodable``)."""
    fs, path = filesystem(uri, storage)
    _check_file(fs, path, uri)
    try:
        options = {"block_size": _REMOTE_BLOCK_SIZE} if is_remote(uri) else {}
        with fs.open(path, "rb", **options) as handle, av.open(handle, mode="r") as container:
            yield container
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, EOFError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise VideoError(f"{uri}: cannot decode ({reason}); re-encode or drop it") from None


def video_stream(container: Any, uri: str) -> Any:
    """The container's first video stream; a VideoError when it has none."""
    if not container.streams.video:
        raise VideoError(f"{uri}: no video stream; re-encode or drop it")
    return container.streams.video[0]


@dataclass(frozen=True)
class VideoInfo:
    """What a video file's header says: frame rate, frame size, duration in seconds."""

    fps: float
    width: int
    height: int
    duration: float


def probe_video(uri: str, storage: StorageConfig | None = None) -> VideoInfo:
    """The header of ``uri`` (local or remote; no frame decoded). Raises
    :class:`VideoError` naming the file: ``missing``, ``zero_byte`` or ``undecodable``."""
    with opened_video(uri, storage) as container:
        stream = video_stream(container, uri)
        fps = stream.average_rate or stream.guessed_rate
        if not fps or not stream.codec_context.width:
            raise VideoError(f"{uri}: no frame rate or size in the stream; re-encode it")
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:  # microseconds (FFmpeg's AV_TIME_BASE)
            duration = container.duration / 1e6
        else:
            raise VideoError(f"{uri}: no duration in the file; re-encode it")
        return VideoInfo(
            float(fps), stream.codec_context.width, stream.codec_context.height, duration
        )


def _check_file(fs, path: str, uri: str) -> None:
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise VideoError(f"{uri}: video file not found; fix the manifest path", "missing") from None
    if not size:
        raise VideoError(f"{uri}: video file is empty (0 bytes); re-upload it", "zero_byte")


def _decode_wanted(container, wanted: list[int], cut: float, end: float | None, uri: str) -> dict:
    """Frames (RGB arrays) at the sorted ``wanted`` indices, seeking near the first one."""
    stream = video_stream(container, uri)
    _set_decoder_threads(stream)
    fps = stream.average_rate or stream.guessed_rate
    if not fps:
        raise VideoError(f"{uri}: no frame rate in the stream; re-encode it")
    if end is not None and cut + wanted[-1] / float(fps) > end - 1e-6:
        raise VideoError(f"{uri}: frame {wanted[-1]} lies after end={end:g}s", "too_short")
    origin = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
    origin += cut
    frames, first = _collect(container, stream, wanted, origin, float(fps), seek=True)
    if first > wanted[0]:
        # The seek landed past the target (a bad index): decode from the beginning.
        frames, _ = _collect(container, stream, wanted, origin, float(fps), seek=False)
    missing = [i for i in wanted if i not in frames]
    if missing:
        raise VideoError(
            f"{uri}: ends before frame {missing[0]} (cut at {cut:g}s); "
            "the file is truncated or the manifest's num_frames is wrong",
            "truncated",
        )
    return frames


def _collect(
    container, stream, wanted: list[int], origin: float, fps: float, seek: bool
) -> tuple[dict, int]:
    """Decode forward from a keyframe, keeping frames whose index is in ``wanted``.

    Also returns the index of the first decoded frame, to detect a seek that overshot.
    """
    target = origin + wanted[0] / fps - 0.5 / fps
    if seek and target > 0:
        container.seek(int(target / stream.time_base), stream=stream, backward=True)
    else:
        container.seek(0, stream=stream, backward=True)
    keep, last, frames, first = set(wanted), wanted[-1], {}, None
    # One reformatter for the clip: it keeps its swscale context between frames, where
    # ``frame.to_ndarray(format=...)`` builds one per frame (most of a small clip's cost).
    # Its slice threads keep to the decoder's budget (``_set_decoder_threads``): PyAV's
    # default, 0, starts one per core of the machine in a worker given one.
    to_rgb, threads = VideoReformatter(), max(1, torch.get_num_threads())
    seconds_per_tick = float(stream.time_base)  # a Fraction per frame costs more than a frame
    for frame in _decoded(container, stream):
        if frame.pts is None:
            continue
        index = round((frame.pts * seconds_per_tick - origin) * fps)
        first = index if first is None else first
        if index in keep:
            frames[index] = to_rgb.reformat(frame, format="rgb24", threads=threads).to_ndarray()
        if index >= last:
            break
    return frames, (wanted[0] if first is None else first)


def _set_decoder_threads(stream) -> None:
    """Decode with the intra-op thread budget of this process (``torch.get_num_threads``).

    A trainer worker gets ``cpus_per_worker`` threads; FFmpeg's default (one thread per
    core of the machine, plus frame threading) would start threads on every clip and
    compete with the step for cores it was not given.
    """
    threads = torch.get_num_threads()
    if threads <= 1:
        stream.thread_type = "NONE"
        stream.codec_context.thread_count = 1
    else:
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads


def _decoded(container, stream) -> Iterator[av.VideoFrame]:
    """Every frame the decoder yields from the current position (a seam for tests)."""
    yield from container.decode(stream)


def write_video(
    uri: str,
    frames_THWC_uint8: torch.Tensor,
    fps: float,
    storage: StorageConfig | None = None,
    *,
    lossless: bool = False,
) -> None:
    """Write frames as an H.264 (libx264, else MPEG-4 part 2) yuv420p mp4 at ``uri``.

    ``lossless`` writes H.264 in RGB at constant quality 0 (libx264rgb) instead: the frames
    decode back bit-exact, as a world scored pixel by pixel needs (the toy world's 16x16
    frames would lose their colours to yuv420p's 8x8 chroma). Not every player shows it.

    The file is encoded in memory and written in one piece: the mp4 muxer seeks back to
    write its index, which object-store uploads cannot do.
    """
    frames = frames_THWC_uint8
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError("write_video takes uint8 frames shaped (T, H, W, 3)")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError("yuv420p needs even height and width; crop or pad the frames")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        _encode(container, frames, fps, lossless)
    fs, path = filesystem(uri, storage)
    if not is_remote(uri):
        fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "wb") as handle:
        handle.write(buffer.getvalue())


def _encode(container, frames: torch.Tensor, fps: float, lossless: bool = False) -> None:
    stream = _add_stream(container, Fraction(fps).limit_denominator(1001), lossless)
    stream.height, stream.width = frames.shape[1], frames.shape[2]
    for array in frames.numpy():
        container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
    container.mux(stream.encode())


def _add_stream(container, rate: Fraction, lossless: bool):
    if lossless:  # PyAV's wheels bring libx264rgb; a build without it fails here, plainly
        stream = container.add_stream("libx264rgb", rate=rate)
        stream.pix_fmt = "rgb24"
        stream.options = {"crf": "0", "preset": "veryfast", "x264-params": "mbtree=0"}
        return stream
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    stream = container.add_stream(codec, rate=rate)
    stream.pix_fmt = "yuv420p"
    if codec == "libx264":
        # Without the macroblock tree (x264's lookahead rate control), the same frames
        # encode to the same file: with it, 40 encodes of one 17-frame 32x32 clip made 6
        # different files here (single-threaded too), so one dataset trained to different
        # losses. It costs some bitrate at the same quality.
        stream.options = {"crf": "18", "preset": "veryfast", "x264-params": "mbtree=0"}
    return stream
