"""The model components of a training run: Mask²DiT transformer, frozen VAE and T5, scheduler.

``source: tiny`` builds every component from small config dicts (nothing is downloaded);
any other source is a diffusers CogVideoX folder - a local path or an ``s3://`` URI that is
first copied into a local cache - with the subfolders ``transformer``, ``vae``,
``text_encoder``, ``tokenizer`` and ``scheduler``. :func:`save_tiny_pretrained` writes the
tiny components as such a folder, so tests exercise the real loading path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler
from transformers import AutoTokenizer, ByT5Tokenizer, T5Config, T5EncoderModel

from infra.config import ModelConfig, StorageConfig
from infra.errors import ConfigError, StorageError
from infra.storage import filesystem, is_remote
from mask2dit.model import Mask2DiT
from mask2dit.presets import COGVIDEOX_SCHEDULER, build_transformer, preset_config

__all__ = [
    "SUBFOLDERS",
    "Components",
    "load_components",
    "resolve_model_folder",
    "save_tiny_pretrained",
]

SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
TINY_PRESET = "tiny"

# A 4-level CogVideoX VAE: 8x spatial and 4x temporal compression (4k+1 -> k+1 frames),
# as diffusers' own VAE tests build it; latent channels match the tiny transformer.
_TINY_VAE: dict[str, Any] = {
    "block_out_channels": (8, 8, 8, 8),
    "layers_per_block": 1,
    "norm_num_groups": 2,
    "temporal_compression_ratio": 4,
    "sample_height": 32,
    "sample_width": 32,
}
_TINY_T5: dict[str, Any] = {
    "d_kv": 8,
    "d_ff": 32,
    "num_layers": 1,
    "num_heads": 2,
    "relative_attention_num_buckets": 8,
    "dropout_rate": 0.0,
}


@dataclass
class Components:
    """Everything a training step needs besides the optimizer."""

    transformer: Mask2DiT
    vae: AutoencoderKLCogVideoX
    text_encoder: T5EncoderModel
    tokenizer: Any
    scheduler: CogVideoXDDIMScheduler


def load_components(
    model: ModelConfig,
    storage: StorageConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    policy: str = "v2",
    seed: int = 0,
) -> Components:
    """Build or load the components of ``model.source`` onto ``device``.

    The VAE and T5 are frozen (eval, no grad) and cast to ``dtype``. The transformer stays
    float32 on ``device``: DeepSpeed owns its training precision (it casts for bf16).
    ``seed`` only affects ``tiny`` weights.
    """
    if model.source == "tiny":
        parts = _tiny_parts(seed)
    else:
        parts = _load_folder(resolve_model_folder(model.source, storage))
    transformer, vae, text_encoder, tokenizer, scheduler = parts
    for frozen in (vae, text_encoder):
        frozen.requires_grad_(False)
        frozen.eval()
        frozen.to(device)
        if next(frozen.parameters()).dtype != dtype:  # diffusers warns on a no-op cast
            frozen.to(dtype=dtype)
    return Components(
        transformer=Mask2DiT(transformer.to(device), policy=policy),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
    )


def save_tiny_pretrained(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny components as a diffusers CogVideoX folder; returns its path."""
    root = Path(path)
    transformer, vae, text_encoder, tokenizer, scheduler = _tiny_parts(seed)
    transformer.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    text_encoder.save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    scheduler.save_pretrained(root / "scheduler")
    return root


def _tiny_parts(seed: int) -> tuple[Any, ...]:
    """Tiny transformer, VAE, T5, tokenizer and scheduler, weights drawn from ``seed``."""
    cfg = preset_config(TINY_PRESET)
    tokenizer = ByT5Tokenizer()
    transformer = build_transformer(TINY_PRESET, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLCogVideoX(latent_channels=cfg["in_channels"], **_TINY_VAE)
        t5 = T5Config(vocab_size=len(tokenizer), d_model=cfg["text_embed_dim"], **_TINY_T5)
        text_encoder = T5EncoderModel(t5)
    scheduler = CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER)
    return transformer, vae, text_encoder, tokenizer, scheduler


def _load_folder(root: Path) -> tuple[Any, ...]:
    """Load the five components from a local diffusers CogVideoX folder."""
    from diffusers import CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel.from_pretrained(root / "transformer")
    vae = AutoencoderKLCogVideoX.from_pretrained(root / "vae")
    text_encoder = T5EncoderModel.from_pretrained(root / "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    scheduler = CogVideoXDDIMScheduler.from_pretrained(root / "scheduler")
    return transformer, vae, text_encoder, tokenizer, scheduler


def resolve_model_folder(
    source: str, storage: StorageConfig | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The local folder of ``source``: the path itself, or an ``s3://`` copy in the cache.

    Raises ``ConfigError`` when the folder or one of its subfolders is missing.
    """
    if not is_remote(source):
        root = Path(source.removeprefix("file://")).expanduser()
        _check_local_folder(root, source)
        return root
    return _download(source, storage, Path(cache_dir or _default_cache()))


def _check_local_folder(root: Path, source: str) -> None:
    if not root.is_dir():
        raise ConfigError(
            f"model.source {source}: no such folder; give a diffusers CogVideoX folder "
            "(path or s3:// URI) or 'tiny'"
        )
    missing = [name for name in SUBFOLDERS if not (root / name).is_dir()]
    if missing:
        raise ConfigError(
            f"model.source {source}: missing subfolder(s) {', '.join(missing)}; a diffusers "
            f"CogVideoX folder has {', '.join(SUBFOLDERS)}"
        )


def _default_cache() -> str:
    return os.environ.get("M2D_MODEL_CACHE", os.path.join(tempfile.gettempdir(), "m2d-models"))


def _download(source: str, storage: StorageConfig | None, cache: Path) -> Path:
    """Copy ``source`` into ``cache`` once; concurrent ranks race safely via rename."""
    target = cache / hashlib.sha256(source.encode()).hexdigest()[:16]
    if target.is_dir():
        return target
    fs, path = filesystem(source, storage)
    try:
        listed = set(fs.ls(path, detail=False))
    except FileNotFoundError:
        listed = set()
    except OSError as exc:
        raise StorageError(f"model.source {source}: cannot list ({exc})") from None
    present = {name.rstrip("/").rsplit("/", 1)[-1] for name in listed}
    missing = [name for name in SUBFOLDERS if name not in present]
    if missing:
        raise ConfigError(
            f"model.source {source}: missing subfolder(s) {', '.join(missing)}; upload a "
            f"diffusers CogVideoX folder with {', '.join(SUBFOLDERS)}"
        )
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".download-"))
    try:
        for name in SUBFOLDERS:
            fs.get(f"{path.rstrip('/')}/{name}", str(staging / name), recursive=True)
        os.replace(staging, target)
    except OSError as exc:
        if target.is_dir():  # another rank finished first
            return target
        raise StorageError(f"model.source {source}: download failed ({exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
