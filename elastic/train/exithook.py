"""One line instead of a traceback when an elastic error ends a training script.

A worker that stops on a bad setting, or because etcd is gone, printed a long
traceback and the launcher restarted it to fail the same way again. With the
hook an :class:`ElasticError` that escapes the script's main prints
``elastic: error: ...`` and exits with a code that tells the launcher whether a
restart can help (``EXIT_FATAL``: it cannot). Other exceptions keep Python's
traceback; ``ELASTIC_TRACEBACK=1`` keeps it for elastic errors too.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType

from ..base.errors import (
    ConfigError,
    ElasticError,
    EtcdRequestError,
    EtcdUnavailableError,
    ShardLostError,
)
from ..base.exitcodes import EXIT_FAILED, EXIT_FATAL

_ETCD_HINT = (
    "; is the job's etcd still running? (a job that finished stops the embedded "
    "etcd of its first launcher: start a new job)"
)


def exit_code_for(exc: ElasticError) -> int:
    # A setting or a refused etcd request fails the same way after a restart;
    # an unreachable etcd may come back, and the launcher checks that itself.
    fatal = (ConfigError, EtcdRequestError, ShardLostError)
    return EXIT_FATAL if isinstance(exc, fatal) else EXIT_FAILED


def error_line(exc: ElasticError) -> str:
    text = " ".join(str(exc).split())  # one line, whatever the cause's repr held
    if isinstance(exc, EtcdUnavailableError):
        text += _ETCD_HINT
    return f"elastic: error: {text}"


def _hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if not isinstance(exc, ElasticError) or os.environ.get("ELASTIC_TRACEBACK") == "1":
        _previous(kind, exc, tb)
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    # The real stderr: torch.distributed's own excepthook (installed when a
    # process group forms) calls this one with sys.stderr swapped for a buffer
    # it prints afterwards, with a rank prefix; os._exit below would lose it.
    err = sys.__stderr__ or sys.stderr
    err.write(error_line(exc) + "\n")
    err.flush()
    # The interpreter would exit 1 after any hook; the launcher needs the code.
    # The Trainer's own resources were released by fit()'s finally already.
    os._exit(exit_code_for(exc))


_previous = sys.excepthook


def install_exit_hook() -> None:
    """Idempotent; chains to the hook that was installed before."""
    global _previous
    if sys.excepthook is not _hook:
        _previous = sys.excepthook
        sys.excepthook = _hook
