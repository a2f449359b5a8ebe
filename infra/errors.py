"""The exception hierarchy every part of m2d raises for problems a user can fix.

The classes keep their message in ``args`` only, so they pickle across Ray processes
(a Ray worker's error reaches the driver as the same type with the same text).
"""

from __future__ import annotations


class M2DError(Exception):
    """Base of all m2d errors: the message is one line that names the fix."""


class ConfigError(M2DError):
    """A cluster profile, stage recipe or `--set` override is invalid."""


class DataError(M2DError):
    """A manifest, video or dataset cannot be used."""


class StorageError(M2DError):
    """A storage location (local path or object store) cannot be reached or written."""


class ServiceError(M2DError):
    """A service m2d talks to (Ray, MLflow) cannot be reached or refused the request."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of a library's exception text (its type name if it has none), for
    one-line messages about services: their errors often carry a whole response body."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]
