"""The object store as Ray Train sees it: a pyarrow filesystem over s3fs whose every
operation is retried while the store fails (``infra.storage.retry_storage``).

Ray Train's controller and workers upload checkpoints, write its run snapshot and delete
old checkpoints through this one filesystem; without retries a store that is down for
seconds ends the run from inside Ray (a ``ControllerError``). A file written through it
goes to a local temporary file first and is put whole, retried, when it is closed (a
stream cut halfway cannot be retried); reads rely on s3fs' own retries once open.

``pyarrow.fs.copy_files`` drops an error raised on such a close (a ``with`` block does
not), so checkpoints are not uploaded through it: ``trainer.checkpointing.upload_checkpoint``.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any

import pyarrow
import pyarrow.fs

from infra.storage import RESUME_FIX, retry_storage

__all__ = ["RetryingHandler"]

# FSSpecHandler's methods that are retried whole, and what the message calls them.
_RETRIED = {
    "get_file_info": "a listing",
    "get_file_info_selector": "a listing",
    "create_dir": "a folder's creation",
    "delete_dir": "a deletion",
    "delete_dir_contents": "a deletion",
    "delete_root_dir_contents": "a deletion",
    "delete_file": "a deletion",
    "move": "a move",
    "copy_file": "a copy",
}


class RetryingHandler(pyarrow.fs.FSSpecHandler):
    """``pyarrow.fs.PyFileSystem(RetryingHandler(fs, retry_s, root))``: fsspec ``fs`` with
    each operation retried for up to ``retry_s`` seconds, then one ``StorageError`` line
    naming ``root`` (the storage the run writes to)."""

    def __init__(self, fs: Any, retry_s: float, root: str) -> None:
        super().__init__(fs)
        self.retry_s, self.root = retry_s, root

    def __reduce__(self):  # Ray sends the filesystem to its controller and workers
        return RetryingHandler, (self.fs, self.retry_s, self.root)

    def retried(self, what: str, action):
        return retry_storage(action, f"{what} on {self.root}", self.retry_s, RESUME_FIX)

    # pyarrow's FSSpecHandler asks ``isfile`` before it opens a file to read, and s3fs'
    # ``isfile`` answers False when the store does not answer: an outage would read as
    # "file not found", which is never retried. Opening at once lets the store's own error
    # say which it is (a missing file is still FileNotFoundError).
    def _open_for_reading(self, path: str):
        return pyarrow.PythonFile(self.fs.open(path, mode="rb"), mode="r")

    def open_input_stream(self, path):
        return self.retried("a read", lambda: self._open_for_reading(path))

    def open_input_file(self, path):
        return self.retried("a read", lambda: self._open_for_reading(path))

    def open_output_stream(self, path, metadata):
        return pyarrow.PythonFile(_PutOnClose(self, path), mode="w")

    def open_append_stream(self, path, metadata):
        raise NotImplementedError("checkpoints are written whole")


def _retrying(name: str, what: str):
    plain = getattr(pyarrow.fs.FSSpecHandler, name)

    def method(self: RetryingHandler, *args):
        return self.retried(what, lambda: plain(self, *args))

    method.__name__ = name
    return method


for _name, _what in _RETRIED.items():
    setattr(RetryingHandler, _name, _retrying(_name, _what))


class _PutOnClose(io.FileIO):
    """A local temporary file that goes to ``path`` on storage when it is closed."""

    def __init__(self, handler: RetryingHandler, path: str) -> None:
        handle, local = tempfile.mkstemp(prefix="m2d-put-")
        os.close(handle)
        super().__init__(local, "wb")
        self.handler, self.path, self.local = handler, path, local

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        try:
            put = self.handler.fs.put_file
            self.handler.retried(f"the upload of {self.path}", lambda: put(self.local, self.path))
        finally:
            os.unlink(self.local)
