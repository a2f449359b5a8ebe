"""Pictures of a generated story for the MLflow dashboard, which shows GIF and PNG inline.

``write_gif`` plays the scenes one after another; ``write_contact_sheet`` lays out a few
frames of every scene, one row per scene. Scenes are uint8 numpy arrays (T, H, W, 3) of
the same H x W (T may differ). Paths are local paths or URIs (written through fsspec).
The mp4 of a story is ``infra.video.write_video``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from infra.config import StorageConfig
from infra.storage import filesystem, is_remote

__all__ = [
    "PREVIEW_SIDE",
    "contact_sheet_indices",
    "gif_durations",
    "preview_frames",
    "write_contact_sheet",
    "write_gif",
]

PREVIEW_SIDE = 256  # longest side of the MLflow previews, in pixels


def preview_frames(frames_THWC: np.ndarray, side: int = PREVIEW_SIDE) -> np.ndarray:
    """Frames scaled down (antialiased) so the longest side is at most ``side`` pixels."""
    import torch
    import torch.nn.functional as F

    height, width = frames_THWC.shape[1:3]
    scale = side / max(height, width)
    if scale >= 1:
        return frames_THWC
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    video = torch.from_numpy(frames_THWC).permute(0, 3, 1, 2).float()
    small = F.interpolate(video, size=size, mode="bilinear", antialias=True)
    return small.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_gif(
    scenes: Sequence[np.ndarray],
    path: str,
    fps: float = 8,
    storage: StorageConfig | None = None,
) -> None:
    """An animated GIF of all scenes in order, looping forever, at ``fps`` frames per second.

    GIF delays are whole centiseconds, so frame delays alternate (e.g. 120/130 ms at 8 fps)
    to keep the total length right. Pillow merges a frame identical to the one before it
    into a longer delay (same playback, fewer frames in the file).
    """
    frames = [Image.fromarray(frame) for frame in np.concatenate(_checked(scenes))]
    buffer = io.BytesIO()
    frames[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=frames[1:],
        duration=gif_durations(len(frames), fps),
        loop=0,
    )
    _write(path, buffer.getvalue(), storage)


def gif_durations(num_frames: int, fps: float) -> list[int]:
    """Per-frame delays in ms, multiples of 10, whose running sum tracks ``i * 1000 / fps``."""
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    ends = [int((i + 1) * 100 / fps + 0.5) * 10 for i in range(num_frames)]
    # At most 100 fps: a GIF cannot delay less than 10 ms.
    return [max(end - start, 10) for start, end in zip([0, *ends], ends, strict=False)]


def write_contact_sheet(
    scenes: Sequence[np.ndarray],
    path: str,
    frames_per_scene: int = 4,
    gap: int = 4,
    storage: StorageConfig | None = None,
) -> None:
    """A PNG grid: one row per scene, ``frames_per_scene`` evenly spaced frames as columns.

    Columns include the first and last frame of each scene (``contact_sheet_indices``);
    cells are separated by ``gap`` white pixels.
    """
    scenes = _checked(scenes)
    height, width = scenes[0].shape[1:3]
    rows, cols = len(scenes), frames_per_scene
    sheet = np.full(
        (rows * height + (rows - 1) * gap, cols * width + (cols - 1) * gap, 3), 255, np.uint8
    )
    for row, scene in enumerate(scenes):
        for col, index in enumerate(contact_sheet_indices(len(scene), frames_per_scene)):
            top, left = row * (height + gap), col * (width + gap)
            sheet[top : top + height, left : left + width] = scene[index]
    buffer = io.BytesIO()
    Image.fromarray(sheet).save(buffer, format="PNG")
    _write(path, buffer.getvalue(), storage)


def contact_sheet_indices(num_frames: int, frames_per_scene: int) -> list[int]:
    """``frames_per_scene`` evenly spaced frame indices, first and last included.

    A scene shorter than ``frames_per_scene`` repeats frames so every row is full.
    """
    if frames_per_scene < 1 or num_frames < 1:
        raise ValueError("frames_per_scene and num_frames must be >= 1")
    if frames_per_scene == 1:
        return [0]
    return [round(i * (num_frames - 1) / (frames_per_scene - 1)) for i in range(frames_per_scene)]


def _checked(scenes: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The scenes, after checking they are non-empty uint8 (T, H, W, 3) of one size."""
    if not scenes:
        raise ValueError("a preview needs at least one scene")
    for scene in scenes:
        if scene.dtype != np.uint8 or scene.ndim != 4 or scene.shape[-1] != 3 or not len(scene):
            raise ValueError(
                f"scenes must be uint8 (T, H, W, 3) with T >= 1, got {scene.dtype} "
                f"{tuple(scene.shape)}"
            )
    sizes = {scene.shape[1:3] for scene in scenes}
    if len(sizes) > 1:
        raise ValueError(f"scenes must share one frame size, got {sorted(sizes)}")
    return list(scenes)


def _write(path: str, data: bytes, storage: StorageConfig | None) -> None:
    fs, fs_path = filesystem(path, storage)
    if not is_remote(path):
        fs.makedirs(fs._parent(fs_path), exist_ok=True)
    with fs.open(fs_path, "wb") as handle:
        handle.write(data)
