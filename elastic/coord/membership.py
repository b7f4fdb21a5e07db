"""Liveness and membership: leases kept alive, member records, mirrored prefixes.

A :class:`Session` is an etcd lease kept alive by a background thread; its
``lost`` event fires when the lease is gone (expired, revoked) or could not be
refreshed for longer than its TTL, after which nothing may assume its keys
still exist. A :class:`PrefixMirror` keeps a local copy of every key under a
prefix current through a watch that resumes from the last revision it saw and,
when that revision was compacted away, re-lists and reports the difference as
events, so no join or leave is missed.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import grpc
from etcd3 import etcdrpc
from etcd3 import exceptions as etcd_exc
from etcd3.utils import prefix_range_end

from ..base.errors import ConfigError, EtcdUnavailableError, SessionLostError
from .etcd import TRANSIENT_ERRORS, retry_call
from .keys import Keyspace, validate_name

log = logging.getLogger(__name__)
T = TypeVar("T")
_DELETE = 1  # mvccpb.Event.DELETE
# A member whose lease is not renewed for this long is gone (--lease-ttl).
LEASE_TTL_S = 5.0


class Session:
    """An etcd lease kept alive until ``close()`` or until it is lost."""

    def __init__(
        self,
        client: Any,
        ttl: float = LEASE_TTL_S,
        *,
        keepalive_interval: float | None = None,
        op_timeout: float = 10.0,
    ) -> None:
        if ttl < 1:
            raise ConfigError(f"lease ttl must be >= 1 second, got {ttl}")
        self.client = client
        # etcd leases have whole-second TTLs.
        self.ttl = int(math.ceil(ttl))
        self.keepalive_interval = keepalive_interval or max(0.2, self.ttl / 4)
        self.lost = threading.Event()
        self.lost_reason = ""
        self._stop = threading.Event()
        self._callbacks: list[Callable[[str], None]] = []
        lease = retry_call(
            lambda: client.lease(self.ttl), what="granting a lease", timeout=op_timeout
        )
        self.lease_id: int = lease.id
        # etcd raises TTLs below its minimum (2 s with default election
        # settings): judge silence by the TTL the lease really has.
        if lease.ttl and int(lease.ttl) > self.ttl:
            self.ttl = int(lease.ttl)
            if keepalive_interval is None:
                self.keepalive_interval = max(0.2, self.ttl / 4)
        self._last_ok = time.monotonic()
        self._thread = threading.Thread(
            target=self._keepalive, name=f"lease-{self.lease_id:x}", daemon=True
        )
        self._thread.start()

    def on_lost(self, callback: Callable[[str], None]) -> None:
        self._callbacks.append(callback)
        if self.lost.is_set():
            callback(self.lost_reason)

    def check(self) -> None:
        if self.lost.is_set():
            raise SessionLostError(f"session lease {self.lease_id:x} lost: {self.lost_reason}")

    def _mark_lost(self, reason: str) -> None:
        if self.lost.is_set():
            return
        self.lost_reason = reason
        self.lost.set()
        (log.info if reason == "closed" else log.warning)(
            "session lease %x lost: %s", self.lease_id, reason
        )
        for cb in list(self._callbacks):
            try:
                cb(reason)
            except Exception:  # a callback must not stop the others
                log.exception("session lost callback failed")

    def _keepalive(self) -> None:
        while not self._stop.wait(self.keepalive_interval):
            # Measured before the request: a process frozen by SIGSTOP resumes
            # here and must not count the freeze as "recently refreshed".
            try:
                ttl = None
                responses = self.client.refresh_lease(self.lease_id)
                try:
                    for resp in responses:
                        ttl = resp.TTL
                        break
                finally:
                    # Cancel the keepalive stream now, not whenever the
                    # suspended generator is collected (maybe at exit).
                    responses.close()
                if not ttl or ttl <= 0:
                    self._mark_lost("lease expired or was revoked")
                    return
                self._last_ok = time.monotonic()
            except TRANSIENT_ERRORS as exc:
                silent = time.monotonic() - self._last_ok
                if silent > self.ttl:
                    self._mark_lost(f"no keepalive for {silent:.1f}s > ttl {self.ttl}s ({exc!r})")
                    return
            except Exception as exc:  # unexpected: report, do not spin
                self._mark_lost(f"keepalive failed: {exc!r}")
                return

    def close(self, timeout: float = 2.0) -> None:
        """Stop keeping the lease alive and revoke it (its keys vanish at once)."""
        self._stop.set()
        self._thread.join(timeout)
        if not self.lost.is_set():
            try:
                retry_call(
                    lambda: self.client.revoke_lease(self.lease_id),
                    what="revoking the lease",
                    timeout=timeout,
                )
            except SessionLostError:
                pass  # expired already: nothing left to revoke
            except EtcdUnavailableError as exc:
                log.warning("could not revoke lease %x (expires by ttl): %s", self.lease_id, exc)
            self._mark_lost("closed")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Member:
    """What a member publishes about itself."""

    id: str
    address: str = ""
    # host:port of the torch.distributed store this member hosts, if any
    store: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    registered_at: float = 0.0

    def __post_init__(self) -> None:
        validate_name("member id", self.id)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Member:
        d = json.loads(raw)
        return cls(
            id=d["id"],
            address=d.get("address", ""),
            store=d.get("store", ""),
            meta=d.get("meta", {}),
            registered_at=d.get("registered_at", 0.0),
        )


def register_member(
    client: Any, keys: Keyspace, member: Member, session: Session, timeout: float = 10.0
) -> None:
    """Put the member record under the session's lease (it vanishes with the lease)."""
    session.check()
    if not member.registered_at:
        member = Member(member.id, member.address, member.store, member.meta, time.time())
    retry_call(
        lambda: client.put(keys.member(member.id), member.to_json(), lease=session.lease_id),
        what=f"registering member {member.id}",
        timeout=timeout,
    )


@dataclass(frozen=True)
class KeyValue:
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int

    @classmethod
    def of(cls, kv: Any) -> KeyValue:
        """The parts of an etcd ``mvccpb.KeyValue`` that mirrors and readers keep."""
        return cls(kv.value, kv.create_revision, kv.mod_revision, kv.lease)


@dataclass(frozen=True)
class MirrorEvent:
    kind: str  # "put" or "delete"
    key: str
    value: KeyValue | None


class _Compacted(Exception):
    """The watch's start revision was compacted away."""


class _WatchStream:
    """One etcd watch stream for one prefix, read on its own thread.

    We own the gRPC stream instead of using the client library's shared
    watcher: one broken stream must not silence every other watch of the
    process, and the end of a stream must always reach us.
    """

    def __init__(
        self,
        client: Any,
        prefix: str,
        start_revision: int,
        on_events: Callable[[list[Any]], None],
        on_end: Callable[[BaseException | None], None],
    ) -> None:
        self._requests: queue.Queue = queue.Queue()
        key = prefix.encode()
        create = etcdrpc.WatchCreateRequest(
            key=key, range_end=prefix_range_end(key), start_revision=start_revision
        )
        self._requests.put(etcdrpc.WatchRequest(create_request=create))
        stub = etcdrpc.WatchStub(client.channel)
        self._call = stub.Watch(
            iter(self._requests.get, None),
            credentials=client.call_credentials,
            metadata=client.metadata,
        )
        self._created = threading.Event()
        self._on_events = on_events
        self._on_end = on_end
        self._cancelled = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, name=f"watch{prefix}", daemon=True)
        self._thread.start()

    def wait_created(self, timeout: float) -> None:
        if not self._created.wait(timeout):
            self.cancel()
            raise etcd_exc.WatchTimedOut()
        if self._error is not None:
            raise self._error

    def _read(self) -> None:
        error: BaseException | None = None
        try:
            for rs in self._call:
                if rs.compact_revision:
                    error = _Compacted(rs.compact_revision)
                    break
                if rs.canceled:
                    error = etcd_exc.ConnectionFailedError()
                    break
                if rs.created:
                    self._created.set()
                if rs.events:
                    self._on_events(list(rs.events))
        except grpc.RpcError as exc:
            error = exc
        except Exception as exc:  # a bug in a callback must not kill silently
            log.exception("watch callback failed")
            error = exc
        finally:
            self._error = error or etcd_exc.ConnectionFailedError()
            self._created.set()
            self._requests.put(None)
            if not self._cancelled:
                self._on_end(error)

    def cancel(self) -> None:
        self._cancelled = True
        self._requests.put(None)
        self._call.cancel()


class PrefixMirror:
    """A local, watch-maintained copy of every key under ``prefix``.

    Readers use :meth:`snapshot` or block in :meth:`wait_for` (always with a
    timeout). After a disconnect the watch resumes from the last revision
    applied; if that revision was compacted, the prefix is listed again and the
    difference is reported as events. ``outage_timeout`` bounds how long the
    mirror keeps trying to resubscribe before it reports itself failed.
    """

    def __init__(
        self,
        client: Any,
        prefix: str,
        *,
        on_events: Callable[[list[MirrorEvent]], None] | None = None,
        outage_timeout: float = 30.0,
        op_timeout: float = 10.0,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.on_events = on_events
        self.outage_timeout = outage_timeout
        self.op_timeout = op_timeout
        self.resyncs = 0  # re-lists after compaction (observable in tests)
        self.reconnects = 0
        self._data: dict[str, KeyValue] = {}
        self._rev = 0
        self._epoch = 0
        self._stream: _WatchStream | None = None
        self._cond = threading.Condition()
        self._version = 0
        self._failed: BaseException | None = None
        self._closed = False
        self._needs_relist = False
        self._resubscribe = threading.Event()
        self._closing = threading.Event()  # interrupts reconnect backoff
        self._live_epoch = -1  # epoch of the adopted stream; only its end counts
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------

    def start(self) -> PrefixMirror:
        self._relist()
        retry_call(self._subscribe, what=f"watching {self.prefix}", timeout=self.op_timeout)
        self._thread = threading.Thread(
            target=self._maintain, name=f"mirror{self.prefix}", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._epoch += 1
            self._cond.notify_all()
        self._closing.set()
        self._resubscribe.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        with self._cond:
            stream = self._stream
        if stream is not None:
            stream.cancel()
            # Wait for its reader: a daemon thread still inside gRPC when the
            # interpreter exits can leave a lock held that gRPC's __del__ then
            # waits for forever (seen: a process that never exited).
            stream._thread.join(timeout=2.0)

    # -- reading ---------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._rev

    @property
    def version(self) -> int:
        """Bumped on every applied change; cheap to poll between steps."""
        return self._version

    def snapshot(self) -> dict[str, KeyValue]:
        with self._cond:
            self._raise_if_failed()
            return dict(self._data)

    def get(self, key: str) -> KeyValue | None:
        with self._cond:
            self._raise_if_failed()
            return self._data.get(key)

    def wait_for(
        self,
        predicate: Callable[[dict[str, KeyValue]], T | None],
        timeout: float,
        *,
        wake: threading.Event | None = None,
    ) -> T | None:
        """Return the first non-None ``predicate(data)``; None on timeout or ``wake``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                self._raise_if_failed()
                result = predicate(self._data)
                if result is not None:
                    return result
                left = deadline - time.monotonic()
                if left <= 0 or self._closed or (wake is not None and wake.is_set()):
                    return None
                # With a wake event nobody may notify us about, poll it.
                self._cond.wait(min(left, 0.25) if wake is not None else left)

    def notify(self) -> None:
        """Wake waiters so they re-check a predicate that depends on other state."""
        with self._cond:
            self._cond.notify_all()

    def _raise_if_failed(self) -> None:
        if self._failed is not None:
            raise EtcdUnavailableError(
                f"watch of {self.prefix} lost for more than {self.outage_timeout:.0f}s"
            ) from self._failed

    # -- watch maintenance ------------------------------------------------

    def _relist(self) -> None:
        resp = retry_call(
            lambda: self.client.get_prefix_response(self.prefix),
            what=f"listing {self.prefix}",
            timeout=self.op_timeout,
        )
        fresh = {kv.key.decode(): KeyValue.of(kv) for kv in resp.kvs}
        events: list[MirrorEvent] = []
        with self._cond:
            old = self._data
            for key, kv in old.items():
                new = fresh.get(key)
                if new is None or new.create_revision != kv.create_revision:
                    events.append(MirrorEvent("delete", key, None))
            for key, kv in fresh.items():
                prev = old.get(key)
                if (
                    prev is None
                    or prev.mod_revision != kv.mod_revision
                    or prev.create_revision != kv.create_revision
                ):
                    events.append(MirrorEvent("put", key, kv))
            self._data = fresh
            self._rev = resp.header.revision
            if events:
                self._version += 1
            self._cond.notify_all()
        self._emit(events)

    def _subscribe(self) -> None:
        while True:
            with self._cond:
                self._epoch += 1
                epoch = self._epoch
                start = self._rev + 1
            stream = _WatchStream(
                self.client,
                self.prefix,
                start,
                on_events=lambda evs, e=epoch: self._apply(e, evs),
                on_end=lambda err, e=epoch: self._ended(e, err),
            )
            try:
                stream.wait_created(self.op_timeout)
                with self._cond:
                    # Adopt the stream only if it is still open: the end of a
                    # stream that was never adopted is reported here, by
                    # raising, and not again by _ended (which would trigger a
                    # second subscribe and leak this stream).
                    if stream._error is not None:
                        raise stream._error
                    if self._closed:  # closed while we subscribed: nobody else will cancel it
                        stream.cancel()
                        return
                    self._live_epoch = epoch
                    self._stream = stream
            except _Compacted:
                # Our resume point is gone: list afresh and report the diff.
                self.resyncs += 1
                self._relist()
                continue
            return

    def _ended(self, epoch: int, error: BaseException | None) -> None:
        with self._cond:
            if epoch != self._epoch or epoch != self._live_epoch or self._closed:
                return
            self._epoch += 1  # anything more from the dead stream is ignored
            if isinstance(error, _Compacted):
                self.resyncs += 1
                self._needs_relist = True
        self._resubscribe.set()

    def _apply(self, epoch: int, raw_events: list[Any]) -> None:
        events: list[MirrorEvent] = []
        with self._cond:
            if epoch != self._epoch:
                return
            # Events of one transaction share a revision: compare against the
            # revision before this response, not the running maximum.
            base = self._rev
            for ev in raw_events:
                kv = ev.kv
                if kv.mod_revision <= base:
                    continue
                key = kv.key.decode()
                if ev.type == _DELETE:
                    self._data.pop(key, None)
                    events.append(MirrorEvent("delete", key, None))
                else:
                    rec = KeyValue.of(kv)
                    self._data[key] = rec
                    events.append(MirrorEvent("put", key, rec))
                self._rev = max(self._rev, kv.mod_revision)
            if events:
                self._version += 1
                self._cond.notify_all()
        self._emit(events)

    def _maintain(self) -> None:
        while True:
            self._resubscribe.wait()
            self._resubscribe.clear()
            if self._closed:
                return
            self.reconnects += 1
            outage_start = time.monotonic()
            delay = 0.05
            while not self._closed:
                try:
                    if self._needs_relist:
                        self._needs_relist = False
                        self._relist()
                    self._subscribe()
                    break
                except (EtcdUnavailableError, *TRANSIENT_ERRORS, etcd_exc.WatchTimedOut) as exc:
                    if time.monotonic() - outage_start > self.outage_timeout:
                        with self._cond:
                            self._failed = exc
                            self._cond.notify_all()
                        log.error("giving up on watch of %s: %r", self.prefix, exc)
                        return
                    # Backoff between reconnect attempts, bounded by outage_timeout.
                    # Not on _resubscribe: it may be set again by a failed
                    # attempt, which made this loop spin (2,600 tries in 3 s).
                    self._closing.wait(delay)
                    delay = min(delay * 2, 1.0)

    def _emit(self, events: list[MirrorEvent]) -> None:
        if events and self.on_events is not None:
            try:
                self.on_events(events)
            except Exception:
                log.exception("mirror event callback failed")


class _MirrorPool:
    """One PrefixMirror per (client, prefix), shared by the members using that client.

    Several members in one process (tests, benchmarks, a process driving many
    simulated members) then share one watch stream and one copy of the data,
    as etcd's Go client shares a stream per client.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, str], list[Any]] = {}  # key -> [mirror, users]

    def acquire(self, client: Any, prefix: str, **kwargs: Any) -> PrefixMirror:
        key = (id(client), prefix)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry[1] += 1
                return entry[0]
            # Started under the lock: a second user must not see a half-started
            # mirror. The mirror holds the client, so id(client) stays unique.
            mirror = PrefixMirror(client, prefix, **kwargs).start()
            self._entries[key] = [mirror, 1]
            return mirror

    def release(self, mirror: PrefixMirror) -> None:
        key = (id(mirror.client), mirror.prefix)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] is not mirror:
                mirror.close()
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del self._entries[key]
        mirror.close()


shared_mirrors = _MirrorPool()
