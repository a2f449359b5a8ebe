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


# botocore's exceptions (named, so that nothing here imports botocore), by what they mean.
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_NO_ANSWER = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
}


def environment_problem(exc: BaseException) -> str | None:
    """One line for an exception that says the machine's surroundings are wrong rather than
    m2d - an object store without credentials or that does not answer, a path the process
    cannot read or write - or None for any other exception (a bug: its traceback stays)."""
    name = type(exc).__name__
    if type(exc).__module__.startswith("botocore"):
        if name in _NO_CREDENTIALS:
            return (
                f"the object store found no credentials ({name}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or storage.credentials_file"
            )
        if name in _NO_ANSWER:
            return (
                f"the object store does not answer ({first_line(exc)}); check "
                "storage.endpoint_url and that the store runs"
            )
        return f"the object store refused the request ({name}: {first_line(exc)})"
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}; check the path and its permissions"
    return None
