"""Pretrained modules loaded with their weights in torch's own memory."""

from __future__ import annotations

import itertools
import os
from typing import Any, TypeVar

import torch

__all__ = ["load_pretrained"]

_TORCH_ALIGNMENT = 64  # bytes: c10's CPU allocator
ModelT = TypeVar("ModelT", bound=torch.nn.Module)


def load_pretrained(
    cls: type[ModelT], folder: str | os.PathLike, dtype: torch.dtype | None = None, **kwargs: Any
) -> ModelT:
    """``cls.from_pretrained(folder, **kwargs)`` (cast to ``dtype`` unless ``None``), with
    every weight in memory of its own.

    diffusers and transformers give the model the tensors of a safetensors file's memory
    map when the dtype matches: 8-byte aligned, where torch allocates on 64 bytes. CPU GEMM
    kernels choose their code path by alignment, so the same weights loaded from a training
    checkpoint (torch memory) and from an export (the map) can round differently on one
    CPU and not on another. Misaligned tensors are copied into torch-allocated memory,
    which also lets go of the file.
    """
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    model = cls.from_pretrained(folder, **kwargs)
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.device.type == "cpu" and tensor.data_ptr() % _TORCH_ALIGNMENT:
            tensor.data = tensor.data.clone()
    return model
