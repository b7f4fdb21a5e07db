"""Bounded retries of transient storage errors (tenacity).

Every storage call the store makes goes through `RetryPolicy.call`: a transient
error (connection reset, timeout, throttling, a 5xx) is retried with jittered
exponential backoff, bounded both in attempts and in total time; then it is
surfaced as `StorageUnavailableError` naming the operation and the path.
Permanent errors (missing file, permission denied, already exists) are never
retried: retrying them only delays the clear error.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from storage.errors import InvalidArgumentError, StorageUnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

# errno values that object-store clients (s3fs maps HTTP codes onto errno) and
# network filesystems use for conditions that go away by themselves.
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.EAGAIN,
        errno.EBUSY,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.EPIPE,
        getattr(errno, "EREMOTEIO", errno.EIO),
    }
)
_PERMANENT_OSERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
# botocore / aiohttp exceptions that are not OSError subclasses; matched by name
# so the store does not import optional backends.
_TRANSIENT_CLASS_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ClientPayloadError",
        "ResponseStreamingError",
    }
)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: network trouble, timeouts, throttling."""
    if not isinstance(exc, Exception):
        return False  # SimulatedCrash, KeyboardInterrupt: the process is going away
    if isinstance(exc, _PERMANENT_OSERRORS):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    return any(cls.__name__ in _TRANSIENT_CLASS_NAMES for cls in type(exc).__mro__)


@dataclass(frozen=True)
class RetryPolicy:
    """How transient storage errors are retried.

    max_attempts: tries per operation, including the first (>= 1).
    max_time_s: no new attempt starts after this many seconds since the first.
    initial_backoff_s / max_backoff_s: exponential backoff bounds, with jitter.
    retry_on: predicate deciding which exceptions are transient.
    """

    max_attempts: int = 5
    max_time_s: float = 60.0
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    retry_on: Callable[[BaseException], bool] = is_transient

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise InvalidArgumentError(
                f"RetryPolicy.max_attempts must be an int >= 1, got {self.max_attempts!r}"
            )
        for name in ("max_time_s", "initial_backoff_s", "max_backoff_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise InvalidArgumentError(
                    f"RetryPolicy.{name} must be a number >= 0, got {value!r}"
                )
        if self.max_backoff_s < self.initial_backoff_s:
            raise InvalidArgumentError(
                f"RetryPolicy.max_backoff_s ({self.max_backoff_s!r}) is below "
                f"initial_backoff_s ({self.initial_backoff_s!r})"
            )

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run `fn`, retrying transient errors; `what` names the operation in errors."""
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.max_attempts)
            | tenacity.stop_after_delay(self.max_time_s),
            # "Full jitter": concurrent ranks retrying the same store spread out.
            wait=tenacity.wait_random_exponential(
                multiplier=self.initial_backoff_s, max=self.max_backoff_s
            ),
            retry=tenacity.retry_if_exception(self.retry_on),
            before_sleep=self._log_retry(what),
            reraise=False,
        )
        try:
            return retrying(fn)
        except tenacity.RetryError as exc:
            attempt = exc.last_attempt
            cause = attempt.exception()
            raise StorageUnavailableError(
                f"{what} failed after {attempt.attempt_number} attempt(s): "
                f"{type(cause).__name__}: {cause}"
            ) from cause

    @staticmethod
    def _log_retry(what: str) -> Callable[[tenacity.RetryCallState], None]:
        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "%s: transient error on attempt %d (%s: %s); retrying",
                what,
                state.attempt_number,
                type(exc).__name__,
                exc,
            )

        return before_sleep
