"""One-line-per-event console view and a JSONL event log.

Several processes append to one log file: each event is a single ``write`` on
a file opened with O_APPEND, so lines never interleave.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


class EventLog:
    def __init__(self, path: str | None, *, source: str, console: bool = False) -> None:
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
            sys.stderr.write(f"[elastic] {message}\n")
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
