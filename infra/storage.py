"""Storage over fsspec: one way to open local paths and ``s3://`` URIs everywhere.

Credentials are never passed here: s3fs (botocore) reads them from the environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), an instance role, or the
``AWS_SHARED_CREDENTIALS_FILE`` that ``storage.credentials_file`` points to.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec

from infra.config import DataConfig, StorageConfig
from infra.errors import DataError, StorageError, first_line
from infra.logging import get_logger
from infra.timeouts import network_timeout_s

log = get_logger("storage")

#: s3fs' tries of one request on a timeout or a dropped connection (its default: 5).
S3_TRIES = 3


def storage_options(storage: StorageConfig | None) -> dict[str, Any]:
    """fsspec options for the profile's object store: endpoint and region, and requests
    bounded by ``infra.timeouts`` - one botocore attempt of at most that long (botocore's
    own default: 60 s, up to 5 attempts, on a store that never answers); s3fs tries a
    request that timed out ``S3_TRIES`` times in all (``bounded``)."""
    timeout = network_timeout_s()
    options: dict[str, Any] = {
        # What another process (or another filesystem object) changed is seen at once:
        # m2d lists a folder to decide (checkpoints, items, model parts), rarely often.
        "use_listings_cache": False,
        "config_kwargs": {
            "connect_timeout": timeout,
            "read_timeout": timeout,
            "retries": {"max_attempts": 1},
        },
    }
    if storage is None:
        return options
    client_kwargs: dict[str, Any] = {}
    if storage.endpoint_url:
        client_kwargs["endpoint_url"] = storage.endpoint_url
    if storage.region:
        client_kwargs["region_name"] = storage.region
    if storage.credentials_file:
        os.environ.setdefault("AWS_SHARED_CREDENTIALS_FILE", storage.credentials_file)
    return {**options, "client_kwargs": client_kwargs} if client_kwargs else options


def filesystem(
    uri: str, storage: StorageConfig | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``uri`` and the path inside it.

    Options apply to S3 object stores only (``s3://``); other filesystems take fsspec's
    defaults.
    """
    options = storage_options(storage) if uri.startswith("s3://") else {}
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"{uri}: cannot open this location ({exc})") from None
    return bounded(fs), path


def bounded(fs: Any) -> Any:
    """``fs`` with s3fs' tries of a request set to ``S3_TRIES`` (a class setting of s3fs',
    5, which no constructor argument reaches)."""
    if hasattr(fs, "retries") and type(fs).__module__.startswith("s3fs"):
        fs.retries = S3_TRIES
    return fs


def require(uri: str, storage: StorageConfig | None, key: str, fix: str = "fix the path") -> None:
    """Raise a one-line DataError naming the setting ``key`` and the ``fix`` unless ``uri``
    (a file or a folder) exists: inputs are checked before any job starts, not by its
    workers."""
    fs, path = filesystem(uri, storage)
    try:
        found = fs.exists(path)
    except OSError as exc:
        raise StorageError(f"{key} = {uri}: cannot check it ({first_line(exc)})") from None
    if not found:
        raise DataError(f"{key} = {uri}: not found; {fix}")


def check_stage_input(data: DataConfig, stage: str, storage: StorageConfig | None) -> None:
    """The input that training ``stage`` reads (``DataConfig.stage_input``) must exist;
    with none set (or ``synthetic`` data) there is nothing to check here (the job says
    what to set)."""
    found = data.stage_input(stage)
    if found is None or data.synthetic:
        return
    key, uri = found
    if key.endswith("_latents"):
        fix = f"fix the path or write it with `m2d data precompute --stage {stage} --out ...`"
    else:
        fix = "fix the path (`m2d data synth --out DIR` writes a small synthetic dataset)"
    require(uri, storage, f"data.{key}", fix)


def is_remote(uri: str) -> bool:
    """True for object-store URIs (``s3://...``), False for local paths and file://."""
    return "://" in uri and not uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with '/'."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def write_file(uri: str, data: bytes | str, storage: StorageConfig | None = None) -> None:
    """Write ``data`` at ``uri`` (a local path, its folders made, or a URI); a failure is a
    DataError naming the file."""
    fs, path = filesystem(uri, storage)
    if not is_remote(uri):
        fs.makedirs(fs._parent(path), exist_ok=True)
    try:
        with fs.open(path, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
    except OSError as exc:
        raise DataError(f"{uri}: cannot write ({exc})") from None


def write_jsonl(uri: str, records: list[dict], storage: StorageConfig | None = None) -> None:
    """Write ``records`` as JSON lines at ``uri`` (a local path or a URI)."""
    fs, path = filesystem(uri, storage)
    with fs.open(path, "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)


def parent_folder(uri: str) -> str:
    """The folder of the file at ``uri``: where paths written relative to it start."""
    if is_remote(uri):
        return posixpath.dirname(uri)
    return os.path.dirname(os.path.abspath(uri.removeprefix("file://")))


def relative_to(path: str, base: str) -> str:
    """``path`` as a file under ``base`` writes it (``resolve_relative``'s inverse):
    relative where it lies under ``base``, else as it is."""
    if is_remote(path) != is_remote(base):
        return path
    if is_remote(path):
        prefix = base.rstrip("/") + "/"
        return path[len(prefix) :] if path.startswith(prefix) else path
    relative = os.path.relpath(path, base)
    return path if relative.startswith("..") else relative


def resolve_relative(path: str, base: str) -> str:
    """``path`` as written in a file under ``base``: URIs and absolute paths as they are,
    relative ones joined to ``base`` (a local folder or a URI)."""
    if "://" in path or os.path.isabs(path):
        return path
    if is_remote(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(f'{rest}/{path}')}"
    return os.path.normpath(os.path.join(base, path))


_T = TypeVar("_T")
RESUME_FIX = (
    "the run stops here; once the storage answers, `m2d launch --resume RUN` continues "
    "from its last complete checkpoint (`m2d checkpoints RUN` lists them)"
)


def retry_storage(action: Callable[[], _T], what: str, budget_s: float, fix: str) -> _T:
    """``action()`` until it succeeds, for a storage that may be briefly unreachable: a
    failure is retried after a backoff (1 s doubling to 30 s) for up to ``budget_s``
    seconds, then raised as one :class:`StorageError` line naming ``what`` failed and
    ``fix``. Denied access and a missing path are answers, not outages: raised at once.
    """
    deadline = time.monotonic() + budget_s
    delay, warned = 1.0, False
    while True:
        try:
            return action()
        except (PermissionError, FileNotFoundError, StorageError):
            raise
        except Exception as exc:  # botocore's, s3fs', pyarrow's, OSError...
            left = deadline - time.monotonic()
            if left <= 0:
                raise StorageError(
                    f"{what} failed for {budget_s:.0f} s ({type(exc).__name__}: "
                    f"{first_line(exc)}); {fix}"
                ) from None
            if not warned:
                log.warning(
                    "%s failed (%s); retrying for up to %.0f s", what, first_line(exc), budget_s
                )
                warned = True
            time.sleep(min(delay, left))
            delay = min(2 * delay, 30.0)
