"""Tiny random-weight encoders saved with save_pretrained, for the evaluation tests: real
loading code, known shapes, seconds to build (the same ones `--encoder-path tiny` loads)."""

from evaluation.tiny import tiny_clip, tiny_videomae

__all__ = ["tiny_clip", "tiny_videomae"]
