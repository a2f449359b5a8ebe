"""One logger factory for the whole project, so every module logs the same way.

Records read ``DATE TIME LEVEL m2d.NAME: message`` (``m2d.NAME [rank R]:`` in a training
worker, after ``set_rank``); the CLI's console (``orchestrator.console``) recognises them
in a job's output by that shape. ``progress`` records are the training loop's progress,
one JSON object each, which the console turns into its progress display.
"""

from __future__ import annotations

import json
import logging
from typing import Any

__all__ = ["get_logger", "progress", "set_rank"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s%(rank)s: %(message)s"
_rank = ""


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.rank = _rank
        return super().format(record)


def get_logger(name: str) -> logging.Logger:
    """Return the project logger ``m2d.<name>``, configuring the root handler once."""
    root = logging.getLogger("m2d")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(_Formatter(_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return root.getChild(name)


def set_rank(rank: int) -> None:
    """Mark this process's records as training rank ``rank``'s (the console shows rank 0's
    and every rank's warnings)."""
    global _rank
    _rank = f" [rank {rank}]"


def progress(**fields: Any) -> None:
    """One progress record: ``event="start"`` with ``step``/``steps`` when a worker group
    (re)starts, then ``step``, ``loss``, ``samples_per_s`` and ``checkpoint``."""
    get_logger("progress").info(json.dumps(fields, separators=(",", ":")))
