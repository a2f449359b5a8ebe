"""Training data: manifests, story samplers, and the decoding loader (issue 4).

Names load lazily, so ``python -m trainer.data.manifest`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Clip": "manifest",
    "ShotGroup": "manifest",
    "SkipCounts": "manifest",
    "read_clips": "manifest",
    "read_shot_groups": "manifest",
    "PretrainSampler": "samplers",
    "SFTSampler": "samplers",
    "Story": "samplers",
    "DecodedStory": "loader",
    "StoryLoader": "loader",
    "decode_clip": "loader",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainer.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"trainer.data.{_EXPORTS[name]}"), name)
