"""What a job prints, sorted for the person at the console.

Every line a job prints - Ray's, DeepSpeed's and the workers' included - goes to the job's
log file, named when the job starts. The console gets m2d's own lines: log records of the
``m2d`` loggers (the driver's, and from workers those of rank 0 plus any rank's warnings),
the job entry's ``error: ...`` line, and one progress display fed by the job's
``m2d.progress`` records (``infra.logging.progress``: the training loop's steps, with loss,
samples/s, checkpoints and restarts; another job's ``unit``, say a sampler's items).
``-v`` puts every line on the console as well. The display is live (rich) only when
stderr is a terminal and ``NO_COLOR`` is unset; otherwise it is a plain line at every tenth
of the run and at every checkpoint. Messages go to stderr; a job's data (what it prints on
stdout that is not Ray's) stays on stdout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

__all__ = ["JobConsole", "m2d_message"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Ray prefixes what it forwards from a worker: "(RayTrainWorker pid=123, ip=10.0.0.2) ".
_RAY_PREFIX = re.compile(r"^\((?P<who>[^()]*?pid=\d+[^()]*)\) ")
# infra.logging's format, with the rank a worker adds: "DATE TIME LEVEL m2d.NAME [rank R]: ".
_M2D_RECORD = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<level>[A-Z]+) m2d\.(?P<name>[\w.]+)"
    r"(?: \[rank (?P<rank>\d+)\])?: (?P<message>.*)$"
)
_JOB_LINE = re.compile(r"^(error: .*|stopped)$")  # infra.job_entry.job_main's own last words


def _strip(line: str) -> tuple[str, bool]:
    """The line without colour codes and Ray's forwarding prefix; whether it had one."""
    plain = _ANSI.sub("", line.rstrip("\n"))
    plain = re.sub(r" ?\[repeated \d+x across cluster\]$", "", plain)
    found = _RAY_PREFIX.match(plain)
    return (plain[found.end() :], True) if found else (plain, False)


def m2d_message(line: str) -> tuple[str, str, dict[str, Any] | None] | None:
    """``(level, message, progress)`` when ``line`` is one of m2d's for the console, else
    None. ``progress`` is the record of an ``m2d.progress`` line (else None)."""
    return _message(*_strip(line))


def _message(plain: str, forwarded: bool) -> tuple[str, str, dict[str, Any] | None] | None:
    """``m2d_message`` of a line already stripped (``_strip``)."""
    if not forwarded and _JOB_LINE.match(plain):
        return "ERROR" if plain.startswith("error: ") else "INFO", plain, None
    record = _M2D_RECORD.match(plain)
    if record is None:
        return None
    level, name, rank = record["level"], record["name"], record["rank"]
    if name == "progress":
        try:
            return level, "", json.loads(record["message"])
        except ValueError:
            return None
    if level == "INFO" and rank not in (None, "0"):
        return None  # every rank says it; rank 0 speaks for them
    return level, record["message"], None


class JobConsole:
    """Feed it a job's lines (``feed``); it writes the log and shows m2d's part."""

    def __init__(
        self,
        log_path: Path | str | None,
        verbose: bool = False,
        out: IO[str] | None = None,
        err: IO[str] | None = None,
        name_log_when_hiding: bool = False,
    ) -> None:
        """``name_log_when_hiding``: name the log file on the console when the first line
        is kept off it (a short job that hides nothing, e.g. one refusing its input, then
        says only its own line); otherwise the caller names it at start. ``log_path``
        None: a view of a log already written (`m2d logs`): nothing is written, and the
        progress is plain lines."""
        self.name_log = name_log_when_hiding and log_path is not None
        self.log_path = None if log_path is None else Path(log_path)
        self.log = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log = self.log_path.open("a")
        self.verbose = verbose
        self.out, self.err = out or sys.stdout, err or sys.stderr
        live = self.log is not None and self.err.isatty()
        self.live = live and not os.environ.get("NO_COLOR")
        self.progress: Any = None  # rich Progress while a live display runs
        self.task: Any = None
        self.state: dict[str, Any] = {"checkpoints": 0, "restarts": -1}
        self.shown_tenth = -1

    def feed(self, line: str, data: bool = False) -> None:
        """One line the job printed; ``data``: it came on the job's stdout, where a data
        job prints its results (those stay on stdout, unless they are Ray's)."""
        if self.log is not None:
            self.log.write(line if line.endswith("\n") else line + "\n")
            self.log.flush()
        if self.verbose:
            self._say(line.rstrip("\n"), data)
            return
        plain, forwarded = _strip(line)
        found = _message(plain, forwarded)
        if found is None:
            if data and not forwarded:
                self._say(line.rstrip("\n"), True)
            elif self.name_log:
                self.name_log = False
                self._say(f"log: {self.log_path} (all output; m2d -v shows it here)", False)
            return
        level, message, progress = found
        if progress is not None:
            self._progress(progress)
        elif level in ("WARNING", "ERROR", "CRITICAL") and not message.startswith("error: "):
            self._say(f"{level.lower()}: {message}", False)
        else:
            self._say(message, False)

    def relay(self, process: subprocess.Popen) -> int:
        """Feed ``process``'s stdout (as data) and stderr until both end; its exit status.
        A KeyboardInterrupt propagates (the caller stops or waits for the job)."""
        lock = threading.Lock()

        def read(stream: IO[str], data: bool) -> None:
            for line in stream:
                with lock:
                    self.feed(line, data=data)

        errors = threading.Thread(target=read, args=(process.stderr, False), daemon=True)
        errors.start()
        read(process.stdout, True)
        errors.join()
        return process.wait()

    def say(self, text: str) -> None:
        """A message of the CLI's own, shown like the job's messages."""
        self._say(text, False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.log is not None:
            self.log.close()

    def _say(self, text: str, stdout: bool) -> None:
        if self.progress is not None and not stdout:
            self.progress.console.print(text, markup=False, highlight=False)
            return
        stream = self.out if stdout else self.err
        stream.write(text + "\n")
        stream.flush()

    def _progress(self, event: dict[str, Any]) -> None:
        state = self.state
        if event.get("event") == "start":
            state["restarts"] += 1
            state.update(steps=event["steps"], started=time.monotonic(), start_step=event["step"])
            state["unit"] = event.get("unit", "step")
            return
        fields = ("step", "loss", "samples_per_s", "item")
        state.update({k: event[k] for k in fields if k in event})
        state["checkpoints"] += bool(event.get("checkpoint"))
        steps, step = state.get("steps") or 0, state.get("step", 0)
        if self.live:
            self._show_live(steps, step)
            return
        tenth = (10 * step) // steps if steps else 0
        if tenth > self.shown_tenth or event.get("checkpoint"):
            self.shown_tenth = max(self.shown_tenth, tenth)
            self._say(self._plain_line(steps, step), False)

    def _eta(self, steps: int, step: int) -> str:
        done = step - self.state.get("start_step", 0)
        if not done or "started" not in self.state:
            return "-"
        seconds = (time.monotonic() - self.state["started"]) / done * (steps - step)
        return time.strftime("%H:%M:%S", time.gmtime(seconds))

    def _fields(self, steps: int, step: int) -> str:
        s = self.state
        # A replayed log (`m2d logs`) has no clock to give an ETA by.
        eta = f"  ETA {self._eta(steps, step)}" if self.log is not None else ""
        if s.get("unit", "step") != "step":  # a job of items: the last one done, the ETA
            return f"{s.get('item', '')}{eta}"
        return (
            f"loss {s.get('loss', float('nan')):.4f}  {s.get('samples_per_s', 0.0):.2f} "
            f"samples/s{eta}  checkpoints {s['checkpoints']}  restarts {max(s['restarts'], 0)}"
        )

    def _plain_line(self, steps: int, step: int) -> str:
        return f"{self.state.get('unit', 'step')} {step}/{steps}  {self._fields(steps, step)}"

    def _show_live(self, steps: int, step: int) -> None:
        if self.progress is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.progress = Progress(
                TextColumn(self.state.get("unit", "step")),
                MofNCompleteColumn(),
                BarColumn(bar_width=20),
                TextColumn("{task.fields[details]}"),
                console=Console(file=self.err),
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=steps, details="")
        self.progress.update(
            self.task, completed=step, total=steps, details=self._fields(steps, step)
        )
