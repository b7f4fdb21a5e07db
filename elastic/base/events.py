"""One-line-per-event console view and a JSONL event log.

Several processes append to one log file: each event is a single ``write`` on
a file opened with O_APPEND, so lines never interleave.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any


class EventLog:
    def __init__(self, path: str | None, *, source: str,
                 console: bool | Callable[[str], None] = False) -> None:
        self.path = path
        self.source = source
        self.console = console
        self._fd: int | None = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, event: str, message: str | None = None, **fields: Any) -> None:
        record = {"t": round(time.time(), 6), "source": self.source, "event": event, **fields}
        if self._fd is not None:
            os.write(self._fd, (json.dumps(record, sort_keys=True) + "\n").encode())
        if self.console and message:
            line = f"[elastic] {message}\n"
            if callable(self.console):  # a writer that shares the console (the progress line)
                self.console(line)
            else:
                sys.stderr.write(line)
                sys.stderr.flush()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_events(path: str) -> list[dict[str, Any]]:
    """All events of a log; a torn last line (writer killed mid-write) is skipped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class LogFollower:
    """New complete lines of a JSONL log that other processes append to.

    ``from_end``: skip what the file already holds (an earlier run's events in
    a reused log).
    """

    def __init__(self, path: str, from_end: bool = False) -> None:
        self.path = path
        self.offset = os.path.getsize(path) if from_end and os.path.exists(path) else 0
        self._partial = b""

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for the rest
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a writer killed mid-write
        return out
