"""infra.video against hand-computed indices and pixels, and frames that carry their number."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import pytest
import torch

from infra import video
from infra.errors import DataError
from infra.video import (
    VideoError,
    cover_size,
    read_frames,
    resize_center_crop,
    sample_frame_indices,
    write_video,
)

# --- frame sampling ------------------------------------------------------------------


def test_200_frames_in_the_5_to_95_span_take_stride_3_centered():
    # Span [10, 190): 180 frames; 49 frames at stride 3 need 145; slack 35 -> start 10 + 17.
    assert sample_frame_indices(200) == list(range(27, 172, 3))
    assert sample_frame_indices(200)[:3] == [27, 30, 33] and sample_frame_indices(200)[-1] == 171


def test_60_frames_fall_back_to_stride_1():
    # Span [3, 57): 54 frames; stride 2 needs 97, stride 1 needs 49; slack 5 -> start 5.
    assert sample_frame_indices(60) == list(range(5, 54))


def test_stride_2_when_3_does_not_fit():
    # 120 frames, span [6, 114): 108 usable; stride 3 needs 145, stride 2 needs 97 -> slack 11.
    assert sample_frame_indices(120) == list(range(11, 108, 2))


def test_whole_shot_when_span_is_none():
    # SFT: 49 frames at stride 1 from a 49-frame shot, and 9 frames of 25 at stride 3.
    assert sample_frame_indices(49, span=None) == list(range(49))
    assert sample_frame_indices(25, num_frames=9, span=None) == [0, 3, 6, 9, 12, 15, 18, 21, 24]


def test_random_start_covers_every_valid_start_and_only_those():
    rng = random.Random(0)
    starts = {sample_frame_indices(200, rng=rng)[0] for _ in range(2000)}
    assert starts == set(range(10, 46))  # 10 .. 190 - 145


def test_too_short_raises_data_error_with_reason():
    # 52 frames: span [3, 49) holds 46 < 49 frames even at stride 1.
    with pytest.raises(DataError, match="too short") as info:
        sample_frame_indices(52)
    assert info.value.reason == "too_short"
    with pytest.raises(DataError):
        sample_frame_indices(48, span=None)


# --- resize and crop -----------------------------------------------------------------


def test_cover_size_of_the_paper_case():
    # 1080x1920 -> cover 480x720: scale 480/1080, width 1920 * 4/9 = 853.3 -> 853.
    assert cover_size(1080, 1920, 480, 720) == (480, 853)
    assert cover_size(720, 720, 480, 720) == (720, 720)  # square: width decides


def test_pure_crop_keeps_the_central_pixels_exactly():
    frame = torch.arange(4 * 10, dtype=torch.uint8).reshape(1, 4, 10, 1).expand(1, 4, 10, 3)
    out = resize_center_crop(frame.contiguous(), 4, 6)
    assert out.shape == (1, 3, 4, 6) and out.dtype == torch.uint8
    expected = torch.tensor([[r * 10 + c for c in range(2, 8)] for r in range(4)])
    assert torch.equal(out[0, 0].long(), expected)


def test_downscale_then_crop_samples_the_right_window():
    # A horizontal ramp v(x) = x, 150x300 -> cover 50x50: scale 1/3 -> 50x100, crop left 25.
    # Output column c is resized column c + 25, centered on source x = 3(c + 25) + 1; a
    # symmetric linear filter keeps a linear ramp, so the value is 3c + 76 exactly.
    frame = torch.arange(300).clamp(max=255).to(torch.uint8).expand(150, 300)
    out = resize_center_crop(frame[None, :, :, None].expand(1, 150, 300, 3).contiguous(), 50, 50)
    expected = torch.tensor([3 * c + 76 for c in range(50)], dtype=torch.uint8)
    for channel in range(3):
        assert torch.equal(out[0, channel], expected.expand(50, 50))


def test_downscale_is_antialiased():
    # One bright column at x = 20 of 40; at 1/4 scale plain bilinear samples only x = 4j+1
    # and 4j+2 and would drop it. An antialiasing filter keeps its mass (255/4 spread).
    frame = torch.zeros(1, 8, 40, 3, dtype=torch.uint8)
    frame[:, :, 20] = 255
    out = resize_center_crop(frame, 2, 10)
    assert 50 <= int(out[0, 0, 0].sum()) <= 80


def test_upscale_keeps_quadrant_colors():
    frame = torch.zeros(1, 2, 2, 3, dtype=torch.uint8)
    frame[0, 0, 0] = torch.tensor([255, 0, 0], dtype=torch.uint8)
    out = resize_center_crop(frame, 16, 16)
    assert out.shape == (1, 3, 16, 16)
    assert out[0, :, 0, 0].tolist() == [255, 0, 0] and out[0, :, 15, 15].tolist() == [0, 0, 0]


# --- decoding: frame k carries k in three gray strips (base 8), robust to compression --


def numbered(k: int, height: int = 32, width: int = 48) -> torch.Tensor:
    frame = torch.zeros(height, width, 3, dtype=torch.uint8)
    for strip, digit in enumerate((k // 64, (k // 8) % 8, k % 8)):
        frame[:, strip * 16 : (strip + 1) * 16] = 32 * digit + 16
    return frame


def number_of(frame_HWC: torch.Tensor) -> int:
    digits = [int(frame_HWC[:, s * 16 + 4 : s * 16 + 12].float().mean()) // 32 for s in range(3)]
    return digits[0] * 64 + digits[1] * 8 + digits[2]


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("video") / "numbered.mp4")
    write_video(path, torch.stack([numbered(k) for k in range(300)]), fps=24)
    return path


def test_read_frames_returns_the_requested_frames_in_order(long_video):
    indices = [0, 1, 7, 150, 151, 299, 5]
    frames = read_frames(long_video, indices)
    assert frames.shape == (7, 32, 48, 3) and frames.dtype == torch.uint8
    assert [number_of(f) for f in frames] == indices


def test_read_frames_seeks_instead_of_decoding_from_the_start(long_video, monkeypatch):
    decoded = []
    original = video._decoded

    def counting(container, stream):
        for frame in original(container, stream):
            decoded.append(frame)
            yield frame

    monkeypatch.setattr(video, "_decoded", counting)
    frames = read_frames(long_video, [290, 295])
    assert [number_of(f) for f in frames] == [290, 295]
    # libx264 puts a keyframe at least every 250 frames: a seek decodes from 250 at most.
    assert len(decoded) <= 50, f"decoded {len(decoded)} frames to read 2"


def test_start_end_cut_counts_indices_from_start(long_video):
    # At 24 fps, 5.0 s is frame 120 of the file.
    frames = read_frames(long_video, [0, 2, 23], start=5.0, end=6.0)
    assert [number_of(f) for f in frames] == [120, 122, 143]
    with pytest.raises(VideoError):
        read_frames(long_video, [24], start=5.0, end=6.0)


def test_write_read_roundtrip_of_every_frame(tmp_path):
    path = str(tmp_path / "nested" / "short.mp4")
    write_video(path, torch.stack([numbered(k) for k in range(10)]), fps=8)
    assert [number_of(f) for f in read_frames(path, list(range(10)))] == list(range(10))


def test_write_video_gives_the_same_file_every_time(tmp_path):
    """A dataset written twice is the same dataset (the golden losses train on one). The
    frames are `m2d data synth`'s story001 shot 0: with x264's macroblock tree on, 40
    encodes of them here gave 6 different files."""
    from datajobs import synth

    rng = random.Random("synth:0:1")
    actors = synth._story_cast(rng)
    background = rng.choice(sorted(synth.BACKGROUNDS))
    moves = [rng.choice(sorted(synth.DIRECTIONS)) for _ in actors]
    frames = synth.render_shot(actors, moves, background, 17, 32, 32, rng)
    files = set()
    for attempt in range(24):
        path = tmp_path / f"{attempt}.mp4"
        write_video(str(path), frames, fps=8)
        files.add(path.read_bytes())
    assert len(files) == 1


def test_write_video_refuses_odd_sizes(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(str(tmp_path / "odd.mp4"), torch.zeros(2, 5, 6, 3, dtype=torch.uint8), 8)


# --- bad files: each a DataError naming the file, with a reason ------------------------


def _bad(tmp_path, long_video, kind: str) -> str:
    path = tmp_path / f"{kind}.mp4"
    data = Path(long_video).read_bytes()
    if kind == "zero_byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "text":
        path.write_text("not a video\n")
    return str(path)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("missing", "missing"),
        ("zero_byte", "zero_byte"),
        ("truncated", "undecodable"),
        ("random", "undecodable"),
        ("text", "undecodable"),
    ],
)
def test_bad_files_raise_data_error_naming_the_file(tmp_path, long_video, kind, reason):
    path = _bad(tmp_path, long_video, kind)
    with pytest.raises(DataError) as info:
        read_frames(path, [0, 1])
    assert info.value.reason == reason and path in str(info.value)
    assert "\n" not in str(info.value)


def test_frames_past_the_end_are_truncated(long_video):
    with pytest.raises(VideoError, match="ends before frame 300") as info:
        read_frames(long_video, [10, 300])
    assert info.value.reason == "truncated"


def test_video_error_survives_pickling():
    error = pickle.loads(pickle.dumps(VideoError("x.mp4: gone", "missing")))
    assert (
        isinstance(error, DataError) and error.reason == "missing" and str(error) == "x.mp4: gone"
    )
