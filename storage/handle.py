"""The handle of an asynchronous save."""

from __future__ import annotations

import concurrent.futures
import threading

from storage.errors import SaveTimeoutError
from storage.info import CheckpointInfo


class SaveHandle:
    """A save persisting on the store's background thread.

    `wait` returns its CheckpointInfo or raises its error.  An error nobody has
    seen through `wait` is raised by the store's next save instead, so a failed
    background save is never lost silently.
    """

    def __init__(
        self, step: int, future: concurrent.futures.Future[CheckpointInfo], snapshot_bytes: int
    ) -> None:
        self.step = step
        # Tensor bytes copied for this save: this rank's share of the state, freed when done.
        self.snapshot_bytes = snapshot_bytes
        self._future = future
        self._lock = threading.Lock()
        self._reported = False

    def done(self) -> bool:
        return self._future.done()

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` for the save to finish, without raising its error."""
        concurrent.futures.wait([self._future], timeout)
        return self._future.done()

    def wait(self, timeout: float | None = None) -> CheckpointInfo:
        """Block until the save finished (at most `timeout` seconds; None = no limit)."""
        if not self.join(timeout):
            raise SaveTimeoutError(
                f"asynchronous save of step {self.step} still running after {timeout}s"
            )
        try:
            return self._future.result()
        except BaseException:
            with self._lock:
                self._reported = True
            raise

    def unreported_error(self) -> BaseException | None:
        """The save's error if it failed and nobody has seen it yet (marks it seen)."""
        if not self._future.done():
            return None
        exc = self._future.exception()
        with self._lock:
            if exc is None or self._reported:
                return None
            self._reported = True
            return exc

    def __repr__(self) -> str:
        state = "running" if not self.done() else "done"
        return f"SaveHandle(step={self.step}, {state})"
