"""Tiny random-weight encoders saved with save_pretrained, for the evaluation tests: real
loading code, known shapes, seconds to build."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_clip(folder: Path) -> Path:
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
