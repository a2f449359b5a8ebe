"""Training data: manifests, story samplers, and the decoding loader (issue 4)."""

from trainer.data.loader import DecodedStory, StoryLoader, decode_clip
from trainer.data.manifest import Clip, ShotGroup, SkipCounts, read_clips, read_shot_groups
from trainer.data.samplers import PretrainSampler, SFTSampler, Story

__all__ = [
    "Clip",
    "DecodedStory",
    "PretrainSampler",
    "SFTSampler",
    "ShotGroup",
    "SkipCounts",
    "Story",
    "StoryLoader",
    "decode_clip",
    "read_clips",
    "read_shot_groups",
]
