"""The launcher's live view of a run: one progress line, one summary at the end.

The launcher follows the job's JSONL event log (rank 0 writes a ``step`` event
per step; failures, recoveries, checkpoints and the launcher's own events are in
the same file), so the view needs no channel of its own to the workers. On a
terminal the line is redrawn in place; in a log a plain line is written every
``interval_s`` seconds while steps advance. Every other console line (the
launcher's events, the workers' output, forwarded) goes through the same writer,
which clears the progress line first, so lines never land on top of it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Any

from ..base.errors import ConfigError
from ..base.events import Event, LogFollower
from ..base.exitcodes import EXIT_FAILED, EXIT_FATAL, EXIT_INTERRUPTED, EXIT_STOPPED

_CLEAR = "\r\x1b[K"  # to column 0, erase to the end of the line


@dataclass(frozen=True)
class ProgressConfig:
    interval_s: float = 10.0  # a plain progress line this often when not on a terminal
    refresh_s: float = 0.25  # how often the log is read and a terminal line redrawn
    rate_window: int = 20  # samples/s is averaged over this many recent steps

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ConfigError(f"progress interval must be > 0 seconds, got {self.interval_s}")
        if self.refresh_s <= 0:
            raise ConfigError(f"progress refresh must be > 0 seconds, got {self.refresh_s}")
        if self.rate_window < 2:
            raise ConfigError(f"rate_window must be >= 2 steps, got {self.rate_window}")


@dataclass
class RunStats:
    """What the event log says about a run so far (fed one event at a time)."""

    rate_window: int = 20
    step: int = 0
    total_steps: int | None = None
    global_batch: int | None = None
    loss: float | None = None
    world: int | None = None
    generation: int = 0
    finished: bool = False
    failed_generations: set[int] = field(default_factory=set)
    recoveries: list[float] = field(default_factory=list)
    checkpoints: int = 0
    checkpoint_failures: int = 0
    last_checkpoint: int | None = None
    spawns: int = 0
    steps: deque = field(default_factory=deque)  # (t, step) of the latest steps

    def apply(self, ev: dict[str, Any]) -> None:
        try:
            self._apply(ev)
        except (KeyError, TypeError, ValueError, AttributeError):
            pass  # a malformed record (not one of ours) must not stop the view

    def _apply(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == Event.STEP:
            self.step = int(ev.get("step", self.step))
            self.loss = ev.get("loss", self.loss)
            self.world = ev.get("world", self.world)
            self.generation = ev.get("gen", self.generation)
            self.steps.append((float(ev["t"]), self.step))
            while len(self.steps) > self.rate_window:
                self.steps.popleft()
        elif kind == Event.GENERATION:
            self.generation = ev.get("gen", self.generation)
            self.world = len(ev.get("world") or []) or self.world
            self.step = int(ev.get("step", self.step))
            self.total_steps = ev.get("total_steps", self.total_steps)
            self.global_batch = ev.get("global_batch", self.global_batch)
            # A pause for re-forming is not throughput: measure from here on.
            self.steps.clear()
        elif kind == Event.FAILURE:
            self.failed_generations.add(int(ev.get("gen", -1)))
        elif kind == Event.RECOVERED:
            self.recoveries.append(float(ev.get("seconds", 0.0)))
        elif kind == Event.CHECKPOINT and ev.get("final") or kind == Event.CHECKPOINT_COMMITTED:
            self.checkpoints += 1
            self.last_checkpoint = ev.get("step", self.last_checkpoint)
        elif kind == Event.CHECKPOINT_FAILED:
            self.checkpoint_failures += 1
        elif kind == Event.SPAWN:
            self.spawns += 1
        elif kind == Event.FINISHED:
            self.finished = True
            self.step = int(ev.get("step", self.step))
            self.loss = ev.get("loss", self.loss)

    def steps_per_s(self) -> float | None:
        if len(self.steps) < 2:
            return None
        (t0, s0), (t1, s1) = self.steps[0], self.steps[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    def eta_s(self) -> float | None:
        rate = self.steps_per_s()
        if rate is None or self.total_steps is None:
            return None
        return max(0, self.total_steps - self.step) / rate


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_line(st: RunStats) -> str:
    """step/total, loss, samples/s, world size, ETA."""
    total = st.total_steps
    parts = [
        f"step {st.step}/{total}" + (f" ({100 * st.step // total}%)" if total else "")
        if total
        else f"step {st.step}",
        f"loss {_loss(st.loss)}",
    ]
    rate = st.steps_per_s()
    if rate is None:
        parts.append("samples/s -")
    elif st.global_batch:
        parts.append(f"{rate * st.global_batch:.0f} samples/s")
    else:
        parts.append(f"{rate:.2f} steps/s")
    parts.append(f"world {st.world if st.world is not None else '-'}")
    eta = st.eta_s()
    parts.append(f"ETA {_duration(eta) if eta is not None else '-'}")
    return "  ".join(parts)


_OUTCOMES = {
    0: "finished",
    EXIT_STOPPED: "stopped (our workers left)",
    EXIT_INTERRUPTED: "interrupted",
    EXIT_FAILED: "failed",
    EXIT_FATAL: "failed",
}


def _count(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def format_summary(st: RunStats, rc: int, wall_s: float, nproc: int) -> str:
    """The run in one line: steps, final loss, wall time, failures/recoveries, checkpoints."""
    outcome = "finished" if st.finished else _OUTCOMES.get(rc, f"ended (exit {rc})")
    steps = f"{st.step}/{st.total_steps}" if st.total_steps else str(st.step)
    rec = _count(len(st.recoveries), "recovery", "recoveries")
    if st.recoveries:
        rec += f" (slowest {max(st.recoveries):.2f}s)"
    ckpt = _count(st.checkpoints, "checkpoint")
    if st.last_checkpoint is not None:
        ckpt += f" (last step {st.last_checkpoint})"
    if st.checkpoint_failures:
        ckpt += f", {st.checkpoint_failures} failed"
    return (
        f"{outcome}: {steps} steps, final loss {_loss(st.loss)}, wall {wall_s:.1f}s, "
        f"world {st.world if st.world is not None else '-'}; "
        f"{_count(len(st.failed_generations), 'failure')}, {rec}, "
        f"{_count(max(0, st.spawns - nproc), 'restart')}; {ckpt}"
    )


class ProgressView:
    """Follows an event log and keeps the console: progress line, forwarded lines, summary."""

    def __init__(
        self,
        event_log: str,
        *,
        nproc: int,
        config: ProgressConfig | None = None,
        stream: IO[str] | None = None,
        tty: bool | None = None,
    ) -> None:
        self.config = config or ProgressConfig()
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.nproc = nproc
        self.stats = RunStats(rate_window=self.config.rate_window)
        self.follower = LogFollower(event_log, from_end=True)
        self.started = time.monotonic()
        self._lock = threading.RLock()
        self._shown = ""  # the progress line now on the terminal
        self._seen_errors: set[str] = set()
        self._stop = threading.Event()
        self._readers: list[threading.Thread] = []
        self._by_pid: dict[int, tuple[list[threading.Thread], deque]] = {}
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._thread.start()

    # -- console --------------------------------------------------------------

    def write(self, text: str, stream: IO[str] | None = None) -> None:
        """A console line that must not collide with the progress line."""
        with self._lock:
            if self._shown:
                self.stream.write(_CLEAR)
                self.stream.flush()
            out = stream or self.stream
            out.write(text)
            out.flush()
            if self._shown:
                self.stream.write(self._shown)
                self.stream.flush()

    def forward(self, proc: subprocess.Popen) -> None:
        """Copy a worker's piped stdout and stderr through :meth:`write`."""
        threads: list[threading.Thread] = []
        last_err: deque = deque(maxlen=20)
        for pipe, stream, keep in (
            (proc.stdout, sys.stdout, None),
            (proc.stderr, sys.stderr, last_err),
        ):
            if pipe is not None:
                t = threading.Thread(target=self._pump, args=(pipe, stream, keep), daemon=True)
                t.start()
                threads.append(t)
        self._readers += threads
        self._by_pid[proc.pid] = (threads, last_err)

    def stderr_tail(self, pid: int, timeout: float = 2.0) -> list[str]:
        """The last lines a worker that exited wrote to stderr (read to its end, bounded)."""
        threads, lines = self._by_pid.get(pid, ([], deque()))
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return list(lines)

    def _pump(self, pipe: IO[bytes], stream: IO[str], keep: deque | None) -> None:
        with pipe:
            for raw in iter(pipe.readline, b""):
                line = raw.decode(errors="replace")
                if keep is not None:
                    keep.append(line)
                if line.startswith("elastic: error:"):
                    # Every local worker hits the same bad setting: say it once.
                    with self._lock:
                        if line in self._seen_errors:
                            continue
                        self._seen_errors.add(line)
                try:
                    self.write(line, stream)
                except (OSError, ValueError):
                    # Our console is gone (a closed pipe): keep draining, or the
                    # worker would block on a full pipe.
                    continue

    # -- the line ---------------------------------------------------------------

    def _loop(self) -> None:
        last_plain = time.monotonic()
        plain_step = 0
        while not self._stop.wait(self.config.refresh_s):
            self._drain()
            if self.stats.finished:
                self._draw("")  # the last line would only go stale until the summary
            elif self.stats.steps or self.stats.step:
                line = format_line(self.stats)
                if self.tty:
                    self._draw(line)
                elif (
                    time.monotonic() - last_plain >= self.config.interval_s
                    and self.stats.step != plain_step
                ):
                    last_plain, plain_step = time.monotonic(), self.stats.step
                    self.write(f"[elastic] progress: {line}\n")

    def _drain(self) -> None:
        for ev in self.follower.poll():
            self.stats.apply(ev)

    def _draw(self, line: str) -> None:
        width = shutil.get_terminal_size((100, 24)).columns - 1
        line = line[: max(10, width)]  # a wrapped line cannot be redrawn with \r
        with self._lock:
            if line != self._shown:
                self.stream.write(_CLEAR + line)
                self.stream.flush()
                self._shown = line

    def _stop_loop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        # The rest of what the workers wrote comes before the summary (bounded:
        # a grandchild of a worker may hold a pipe open).
        for t in (self._thread, *self._readers):
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            if self._shown:
                self.stream.write(_CLEAR)
                self.stream.flush()
                self._shown = ""

    def finish(self, rc: int) -> str:
        """Stop following; print and return the one summary line."""
        self._stop_loop()
        self._drain()
        summary = format_summary(self.stats, rc, time.monotonic() - self.started, self.nproc)
        self.write(f"[elastic] summary: {summary}\n")
        return summary

    def close(self) -> None:
        self._stop_loop()
