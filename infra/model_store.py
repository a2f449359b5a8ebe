"""Where a model source lives: a local diffusers CogVideoX folder, or an ``s3://`` copy of one.

A model folder has the subfolders ``transformer``, ``vae``, ``text_encoder``, ``tokenizer``
and ``scheduler``. Remote folders are copied once into a local cache (``M2D_MODEL_CACHE``,
default a temp folder), so the training workers and the sampler's actors load them with
the stock ``from_pretrained``. Needs no torch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from infra.config import StorageConfig
from infra.errors import ConfigError, StorageError
from infra.storage import filesystem, is_remote

__all__ = ["ENCODER_SUBFOLDERS", "SUBFOLDERS", "fetch_folder", "resolve_model_folder"]

SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# What jobs that never run the base transformer read: latent precompute, and sampling a
# trained transformer with the base model's VAE and T5.
ENCODER_SUBFOLDERS = ("vae", "text_encoder", "tokenizer", "scheduler")


def resolve_model_folder(
    source: str,
    storage: StorageConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    subfolders: tuple[str, ...] = SUBFOLDERS,
) -> Path:
    """The local folder of ``source``: the path itself, or an ``s3://`` copy in the cache.

    Only ``subfolders`` are copied (a 5B transformer is ~10 GiB that an encoding job
    does not need). Raises ``ConfigError`` when the folder or one of them is missing.
    """
    if not is_remote(source):
        root = Path(source.removeprefix("file://")).expanduser()
        _check_local_folder(root, source, subfolders)
        return root
    return _download(source, storage, Path(cache_dir or _default_cache()), subfolders)


def _check_local_folder(root: Path, source: str, subfolders: tuple[str, ...]) -> None:
    if not root.is_dir():
        raise ConfigError(
            f"model.source {source}: no such folder; give a diffusers CogVideoX folder "
            "(path or s3:// URI), 'tiny' or 'toy'"
        )
    missing = [name for name in subfolders if not (root / name).is_dir()]
    if missing:
        raise ConfigError(
            f"model.source {source}: missing subfolder(s) {', '.join(missing)}; a diffusers "
            f"CogVideoX folder has {', '.join(SUBFOLDERS)}"
        )


def _default_cache() -> str:
    return os.environ.get("M2D_MODEL_CACHE", os.path.join(tempfile.gettempdir(), "m2d-models"))


def _download(
    source: str, storage: StorageConfig | None, cache: Path, subfolders: tuple[str, ...]
) -> Path:
    """Check that ``source`` has ``subfolders``, then copy it into ``cache`` once."""
    fs, path = filesystem(source, storage)
    try:
        listed = set(fs.ls(path, detail=False))
    except FileNotFoundError:
        listed = set()
    except OSError as exc:
        raise StorageError(f"model.source {source}: cannot list ({exc})") from None
    present = {name.rstrip("/").rsplit("/", 1)[-1] for name in listed}
    missing = [name for name in subfolders if name not in present]
    if missing:
        raise ConfigError(
            f"model.source {source}: missing subfolder(s) {', '.join(missing)}; upload a "
            f"diffusers CogVideoX folder with {', '.join(SUBFOLDERS)}"
        )
    return fetch_folder(source, storage, cache, subfolders=subfolders)


def fetch_folder(
    uri: str,
    storage: StorageConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    subfolders: tuple[str, ...] | None = None,
) -> Path:
    """A local copy of the folder ``uri`` (the folder itself when local), or of only its
    ``subfolders``.

    The cache key covers the objects' names, sizes and ETags, so a changed upload is
    fetched again and an unchanged one never twice. Concurrent processes (ranks, actors)
    race safely: each copies aside, the first rename wins.
    """
    if not is_remote(uri):
        return Path(uri.removeprefix("file://")).expanduser()
    fs, path = filesystem(uri, storage)
    root = path.rstrip("/")
    try:
        listing = fs.find(root, detail=True)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot list ({exc})") from None
    if subfolders is not None:
        listing = {
            name: info
            for name, info in listing.items()
            if name[len(root) + 1 :].split("/", 1)[0] in subfolders
        }
    if not listing:
        raise ConfigError(f"{uri}: no such folder, or it is empty; upload it first")
    stamp = sorted((k, v.get("size"), str(v.get("ETag", ""))) for k, v in listing.items())
    cache = Path(cache_dir or _default_cache())
    target = cache / hashlib.sha256(repr((uri, stamp)).encode()).hexdigest()[:16]
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".download-"))
    try:
        for name in listing:
            local = staging / name[len(root) + 1 :]
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(name, str(local))
        os.replace(staging, target)
    except OSError as exc:
        if target.is_dir():  # another process finished first
            return target
        raise StorageError(f"{uri}: download failed ({exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
