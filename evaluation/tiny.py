"""Tiny random-weight encoders, saved with ``save_pretrained``: what ``--encoder-path tiny``
loads, as ``model.source: tiny`` is the tiny Mask²DiT. They let `make demo` and the tests
run the real loading and scoring code with nothing downloaded; their scores say nothing
about video quality.

Each is built once per machine (seeded, so always the same weights) into a folder under
the system's temporary directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["TINY", "tiny_clip", "tiny_folder", "tiny_videomae"]

#: The encoder path that names a built-in tiny encoder.
TINY = "tiny"


def tiny_clip(folder: Path) -> Path:
    """A 1-layer CLIP (16-wide towers, 32x32 images, a byte-level tokenizer) in ``folder``."""
    import torch
    from transformers import ByT5Tokenizer, CLIPConfig, CLIPModel

    tokenizer = ByT5Tokenizer()
    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    tower["num_attention_heads"] = 2
    text = {**tower, "vocab_size": len(tokenizer), "max_position_embeddings": 32}
    text.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=text,
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_videomae(folder: Path) -> Path:
    """A 1-layer VideoMAE (8 wide, 4 frames of 32x32) in ``folder``: FVD features."""
    import torch
    from transformers import VideoMAEConfig, VideoMAEModel

    config = VideoMAEConfig(
        image_size=32,
        patch_size=8,
        num_frames=4,
        tubelet_size=2,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
    )
    torch.manual_seed(0)
    VideoMAEModel(config).save_pretrained(folder)
    return folder


_BUILDERS: dict[str, Callable[[Path], Path]] = {"clip": tiny_clip, "videomae": tiny_videomae}


def tiny_folder(encoder: str) -> Path:
    """The folder of the tiny ``encoder`` (built on first use); ValueError for an encoder
    with no tiny version."""
    if encoder not in _BUILDERS:
        raise ValueError(
            f"there is no tiny {encoder} encoder (tiny ones: {', '.join(sorted(_BUILDERS))})"
        )
    folder = Path(tempfile.gettempdir()) / f"m2d-tiny-{encoder}"
    if not (folder / "config.json").is_file():
        # Built beside, then renamed: processes starting together never see half a folder.
        scratch = Path(tempfile.mkdtemp(prefix=f"m2d-tiny-{encoder}-"))
        _BUILDERS[encoder](scratch)
        try:
            os.rename(scratch, folder)
        except OSError:  # another process got there first
            shutil.rmtree(scratch, ignore_errors=True)
    return folder
