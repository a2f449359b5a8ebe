"""Story previews decoded back with PIL: frames, sizes, and pixels at known places."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from infra.previews import (
    contact_sheet_indices,
    gif_durations,
    write_contact_sheet,
    write_gif,
)

HEIGHT, WIDTH = 12, 20


def _color(scene: int, frame: int) -> tuple[int, int, int]:
    # Distinct per frame (Pillow merges identical consecutive GIF frames), few colors in
    # all, so the GIF palette holds each one exactly.
    return (40 * scene + 20, 10 * frame, 200 - 30 * scene)


def _scenes(frame_counts: list[int]) -> list[np.ndarray]:
    """Flat-colored scenes; frame t of scene s is ``_color(s, t)`` with a marker corner."""
    scenes = []
    for s, count in enumerate(frame_counts):
        scene = np.empty((count, HEIGHT, WIDTH, 3), np.uint8)
        for t in range(count):
            scene[t] = _color(s, t)
            scene[t, :3, :3] = (255, 255, 0)  # not flat: the row/col layout is visible
        scenes.append(scene)
    return scenes


def _gif_frames(path) -> list[np.ndarray]:
    with Image.open(path) as image:
        frames = []
        for index in range(image.n_frames):
            image.seek(index)
            frames.append(np.asarray(image.convert("RGB")))
        return frames


def test_gif_plays_every_frame_of_every_scene_in_order(tmp_path):
    scenes = _scenes([5, 3, 4])
    write_gif(scenes, str(tmp_path / "story.gif"), fps=8)
    frames = _gif_frames(tmp_path / "story.gif")
    assert len(frames) == 12
    assert all(frame.shape == (HEIGHT, WIDTH, 3) for frame in frames)
    # Frame 6 of the GIF is frame 1 of scene 1 (after scene 0's 5 frames).
    np.testing.assert_allclose(frames[6].astype(int), scenes[1][1].astype(int), atol=2)
    for got, want in zip(frames, np.concatenate(scenes), strict=True):
        np.testing.assert_allclose(got.astype(int), want.astype(int), atol=2)


def test_gif_loops_and_keeps_the_total_length(tmp_path):
    write_gif(_scenes([5, 3, 4]), str(tmp_path / "story.gif"), fps=8)
    with Image.open(tmp_path / "story.gif") as image:
        assert image.info["loop"] == 0
        total = 0
        for index in range(image.n_frames):
            image.seek(index)
            total += image.info["duration"]
    assert total == 1500  # 12 frames at 8 fps


def test_gif_durations_are_centiseconds_that_add_up():
    assert gif_durations(4, 8) == [130, 120, 130, 120]
    durations = gif_durations(49, 8)
    assert all(d % 10 == 0 for d in durations)
    assert abs(sum(durations) - 49 * 125) <= 5
    assert gif_durations(3, 10) == [100, 100, 100]
    with pytest.raises(ValueError):
        gif_durations(3, 0)


def test_gif_writes_into_a_new_folder(tmp_path):
    path = tmp_path / "a" / "b" / "story.gif"
    write_gif(_scenes([2]), str(path))
    assert len(_gif_frames(path)) == 2


def test_contact_sheet_has_one_row_per_scene_and_the_chosen_frames(tmp_path):
    scenes, gap = _scenes([9, 5, 7]), 4
    write_contact_sheet(scenes, str(tmp_path / "sheet.png"), frames_per_scene=4, gap=gap)
    sheet = np.asarray(Image.open(tmp_path / "sheet.png").convert("RGB"))
    assert sheet.shape == (3 * HEIGHT + 2 * gap, 4 * WIDTH + 3 * gap, 3)
    # Evenly spaced, first and last included: 9 frames -> 0, 3, 5 (5.33), 8.
    expected_columns = {0: [0, 3, 5, 8], 1: [0, 1, 3, 4], 2: [0, 2, 4, 6]}
    for row, columns in expected_columns.items():
        for col, frame in enumerate(columns):
            top, left = row * (HEIGHT + gap), col * (WIDTH + gap)
            cell = sheet[top : top + HEIGHT, left : left + WIDTH]
            np.testing.assert_array_equal(cell, scenes[row][frame])
    # The gaps are white.
    assert (sheet[HEIGHT : HEIGHT + gap] == 255).all()
    assert (sheet[:, WIDTH : WIDTH + gap] == 255).all()


def test_contact_sheet_indices():
    assert contact_sheet_indices(49, 4) == [0, 16, 32, 48]
    assert contact_sheet_indices(2, 4) == [0, 0, 1, 1]  # short scenes repeat frames
    assert contact_sheet_indices(7, 1) == [0]


def test_contact_sheet_without_gap_is_exactly_the_frames(tmp_path):
    scenes = _scenes([2, 2])
    write_contact_sheet(scenes, str(tmp_path / "sheet.png"), frames_per_scene=2, gap=0)
    sheet = np.asarray(Image.open(tmp_path / "sheet.png").convert("RGB"))
    want = np.concatenate([np.concatenate(list(scene), axis=1) for scene in scenes], axis=0)
    np.testing.assert_array_equal(sheet, want)


@pytest.mark.parametrize(
    "scenes",
    [
        [],
        [np.zeros((2, HEIGHT, WIDTH, 3), np.float32)],
        [np.zeros((0, HEIGHT, WIDTH, 3), np.uint8)],
        [np.zeros((2, HEIGHT, WIDTH), np.uint8)],
        [np.zeros((2, HEIGHT, WIDTH, 3), np.uint8), np.zeros((2, HEIGHT, 8, 3), np.uint8)],
    ],
    ids=["no-scene", "float", "no-frame", "no-channels", "two-sizes"],
)
def test_bad_scenes_are_rejected(tmp_path, scenes):
    with pytest.raises(ValueError):
        write_gif(scenes, str(tmp_path / "x.gif"))
    with pytest.raises(ValueError):
        write_contact_sheet(scenes, str(tmp_path / "x.png"))
