"""One-line-per-event console view and a JSONL event log.

Several processes append to one log file: each event is a single ``write`` on
a file opened with O_APPEND, so lines never interleave.

The names an event may have are the members of :class:`Event`; the log holds
their string values, so logs written before the enum existed read the same.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any


class Event(str, Enum):
    """Every event the runtime writes, with the fields it carries besides ``t``,
    ``source`` (a member id, or ``launcher-PID``) and ``event`` itself.

    A ``str`` enum so that a member equals, hashes and serialises as its value:
    readers compare the plain strings they parse with these members.
    """

    # Python 3.10 has no StrEnum: print and format as the bare value, not "Event.STEP".
    __str__ = str.__str__
    __format__ = str.__format__

    # -- written by a launcher
    LAUNCH = "launch"  # a launcher started: job, etcd, nproc, joining
    NOTE = "note"  # advice for the user; no fields
    SPAWN = "spawn"  # a worker started: member, pid (torchrun-compat: attempt, port)
    EXIT = "exit"  # a worker exited: member, rc (torchrun-compat: rank, rc, attempt)
    BACKOFF = "backoff"  # a restart waits after quick failures: member, seconds
    EVICTED = "evicted"  # the launcher kills a worker its peers evicted as hung: member
    WAITING = "waiting"  # fewer workers than the minimum are present: present, want
    REVOKE_FAILED = "revoke_failed"  # a dead worker's lease stayed: member, error, error_type
    STOP = "stop"  # a signal asked the job to stop: signal
    STOP_FAILED = "stop_failed"  # the stop request did not reach etcd: error, error_type
    STOP_TIMEOUT = "stop_timeout"  # workers outlived the stop grace and are killed
    GIVE_UP = "give_up"  # a failed worker is not restarted: member (not in torchrun-compat)
    NEVER_JOINED = "never_joined"  # every worker exited without joining the job
    DONE = "done"  # the job finished, as this launcher saw it
    # -- written by a worker; those about the whole World by its rank 0 only
    # rank 0 formed a World: gen, world (ids), step, form_s, src, total_steps, global_batch
    GENERATION = "generation"
    STEP = "step"  # rank 0 finished a step: step, gen, world (size), loss
    RECOVERED = "recovered"  # rank 0's first step after a failure: seconds, step, gen
    FAILURE = "failure"  # this rank's generation failed: gen, rank, step, error, error_type
    JOINED = "joined"  # a live join's state is in (on the joiner): gen, step, bytes, seconds, peers
    REJOIN = "rejoin"  # this member's lease was lost, it registers again: gen
    RESTORE = "restore"  # state loaded from the checkpoint: step
    EVICT = "evict"  # ranks found hung were evicted: members, step, gen, reason
    LEAVE = "leave"  # rank 0 saw this member leave at a step boundary: step, gen
    FINISHED = "finished"  # rank 0 finished training: step, gen, loss
    CHECKPOINT = "checkpoint"  # rank 0 saved (final) or started saving: step, gen, final[, info]
    CHECKPOINT_COMMITTED = "checkpoint_committed"  # an asynchronous save committed: step
    CHECKPOINT_FAILED = "checkpoint_failed"  # a save failed: error, error_type[, step]


# Events about a failure: each carries ``error`` (the message) and ``error_type``
# (the exception's class name), so readers decide on the type, never on the text.
FAILURE_EVENTS = frozenset(
    {Event.FAILURE, Event.CHECKPOINT_FAILED, Event.REVOKE_FAILED, Event.STOP_FAILED}
)


def error_fields(exc: BaseException) -> dict[str, str]:
    """The ``error`` and ``error_type`` fields of a failure event caused by ``exc``."""
    return {"error": str(exc), "error_type": type(exc).__name__}


class EventLog:
    def __init__(
        self, path: str | None, *, source: str, console: bool | Callable[[str], None] = False
    ) -> None:
        self.path = path
        self.source = source
        self.console = console
        self._fd: int | None = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, event: Event, message: str | None = None, **fields: Any) -> None:
        """Append one event; a name outside :class:`Event`, or a failure event
        without its ``error_type``, is a bug in the caller: ValueError."""
        try:
            event = Event(event)
        except ValueError:
            known = ", ".join(e.value for e in Event)
            raise ValueError(f"unknown event {event!r} (known: {known})") from None
        if event in FAILURE_EVENTS and "error_type" not in fields:
            raise ValueError(f"event {event.value!r} needs error_type (see error_fields)")
        record = {"t": round(time.time(), 6), "source": self.source, "event": event.value, **fields}
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


def _parse(lines: Iterable[bytes]) -> list[dict[str, Any]]:
    """The records of complete lines; one that does not decode is skipped: a line
    torn by a writer killed mid-write, cut anywhere, even inside a UTF-8 sequence."""
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:  # JSONDecodeError, or UnicodeDecodeError
            continue
    return out


def read_events(path: str, *, missing_ok: bool = False) -> list[dict[str, Any]]:
    """All events of a log; a torn last line (writer killed mid-write) is skipped.

    ``missing_ok``: a log not created yet holds no events (a job still starting).
    """
    try:
        with open(path, "rb") as f:
            return _parse(f)
    except FileNotFoundError:
        if missing_ok:
            return []
        raise


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
        return _parse(lines)
