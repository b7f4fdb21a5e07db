"""etcd itself failing: SIGKILL + restart on the same data dir, long outages, compaction.

Each test has its own etcd (``fresh_etcd``): they kill it and compact its history.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from elastic.base.errors import SessionLostError
from elastic.coord import membership
from elastic.coord.etcd import EmbeddedEtcd, retry_call
from elastic.coord.keys import Keyspace
from elastic.coord.membership import PrefixMirror, Session
from elastic.coord.rendezvous import RendezvousConfig
from tests.helpers import procs
from tests.helpers.sim import SimMember
from tests.helpers.wait import wait_until


class KeepaliveLog:
    """A client proxy that records when a lease keepalive got a live answer."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.ok_at: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def refresh_lease(self, lease_id: int) -> Iterator[Any]:
        for resp in self._client.refresh_lease(lease_id):
            if resp.TTL > 0:
                self.ok_at.append(time.monotonic())
            yield resp


def put(client: Any, key: str, value: str) -> None:
    """A write that waits (bounded) for a client still reconnecting to a restarted etcd."""
    retry_call(lambda: client.put(key, value), what=f"put {key}", timeout=10)


@pytest.fixture
def members(keys: Keyspace) -> Iterator[list[SimMember]]:
    made: list[SimMember] = []
    yield made
    for m in made:
        m.leave()


def test_committed_state_survives_etcd_sigkill_and_sessions_keep_their_leases(
    fresh_etcd: EmbeddedEtcd,
    make_client: Callable[[str], Any],
    keys: Keyspace,
    members: list[SimMember],
) -> None:
    ttl = 5  # longer than an etcd restart takes; asserted below
    cfg = RendezvousConfig(min_workers=2, lease_ttl=ttl, settle_s=0.1)
    logs = [KeepaliveLog(make_client(fresh_etcd.url)) for _ in range(2)]
    members += [SimMember(log, keys, mid, cfg).start() for log, mid in zip(logs, "ab", strict=True)]
    world = wait_until(
        lambda: all(m.current() for m in members) and members[0].current(), 15, "a World of a and b"
    )
    assert members[0].rdzv.commit_fence(world.generation)(3)
    reader = make_client(fresh_etcd.url)
    before = {
        kv.key: kv.value
        for kv in reader.get_prefix_response(keys.root).kvs
        if not kv.key.decode().startswith(keys.ready)
    }
    assert set(before) >= {
        k.encode()
        for k in (keys.world, keys.gen, keys.commit(3), keys.member("a"), keys.member("b"))
    }

    url, pid = fresh_etcd.url, fresh_etcd.pid
    killed_at = time.monotonic()
    fresh_etcd.kill()
    assert not procs.alive(pid)
    fresh_etcd.restart()
    restarted_at = time.monotonic()
    assert fresh_etcd.url == url
    assert restarted_at - killed_at < ttl, "etcd took longer than the lease TTL to restart"

    # Sessions recover: each lease gets a live keepalive answer after the restart.
    wait_until(
        lambda: all(log.ok_at and log.ok_at[-1] > restarted_at for log in logs),
        ttl,
        "keepalives answered by the restarted etcd",
    )
    assert not any(m.rdzv.session.lost.is_set() for m in members)

    # Nothing committed is lost: World, generation, commit and member records.
    after = retry_call(lambda: reader.get_prefix_response(keys.root), what="read", timeout=10)
    assert {kv.key: kv.value for kv in after.kvs if kv.key in before} == before

    # And the job goes on: a joiner makes generation 2, held by everyone.
    members.append(SimMember(make_client(url), keys, "c", cfg).start())
    wait_until(
        lambda: all((w := m.current()) and w.generation == world.generation + 1 for m in members),
        15,
        "generation 2 held by a, b and c",
    )
    assert members[2].current().ids == (*world.ids, "c")  # survivors first, in their order
    assert not [m.error for m in members if m.error]


def test_session_reports_lost_when_an_etcd_outage_outlasts_its_ttl(
    fresh_etcd: EmbeddedEtcd,
    make_client: Callable[[str], Any],
    keys: Keyspace,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    streams: list[float] = []

    class CountedStream(membership._WatchStream):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            streams.append(time.monotonic())
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(membership, "_WatchStream", CountedStream)
    client = make_client(fresh_etcd.url)
    session = Session(client, ttl=2)
    client.put(keys.member("x"), "x", lease=session.lease_id)
    mirror = PrefixMirror(client, keys.members, outage_timeout=30).start()
    try:
        killed_at = time.monotonic()
        fresh_etcd.kill()
        wait_until(session.lost.is_set, session.ttl + 3, "the session to report lost")
        lost_after = time.monotonic() - killed_at
        # Silence counts from the last answered keepalive, up to one interval before the kill.
        assert session.ttl - session.keepalive_interval <= lost_after
        assert lost_after <= session.ttl + session.keepalive_interval + 1.0
        assert "no keepalive" in session.lost_reason
        with pytest.raises(SessionLostError):
            session.check()
        # The mirror retried with backoff, not in a tight loop.
        attempts = len([t for t in streams if t > killed_at])
        assert 1 <= attempts <= 15, f"{attempts} watch attempts in {lost_after:.1f}s"

        fresh_etcd.restart()
        # The lost session's key does go: nobody keeps its lease alive any more.
        wait_until(
            lambda: mirror.get(keys.member("x")) is None,
            session.ttl + 3,
            "the lost session's key to expire after the restart",
        )
        # The mirror is current again after the multi-second outage.
        put(make_client(fresh_etcd.url), keys.member("y"), "y")
        assert mirror.wait_for(lambda s: True if keys.member("y") in s else None, 10)
        assert mirror.reconnects >= 1
    finally:
        mirror.close()
        session.close()


def test_mirror_recovers_joins_and_leaves_missed_during_an_outage_and_compaction(
    fresh_etcd: EmbeddedEtcd, make_client: Callable[[str], Any], keys: Keyspace
) -> None:
    watcher, writer = make_client(fresh_etcd.url), make_client(fresh_etcd.url)
    for mid in ("a", "b"):
        writer.put(keys.member(mid), mid)
    seen: list[tuple[str, str]] = []
    mirror = PrefixMirror(
        watcher,
        keys.members,
        on_events=lambda evs: seen.extend((e.kind, e.key) for e in evs),
    ).start()
    # Hold the mirror's resubscribe until the missed history is compacted away.
    entered, release = threading.Event(), threading.Event()
    subscribe = mirror._subscribe

    def gated_subscribe() -> None:
        entered.set()
        assert release.wait(30), "test never released the resubscribe"
        subscribe()

    mirror._subscribe = gated_subscribe  # type: ignore[method-assign]
    try:
        assert set(mirror.snapshot()) == {keys.member("a"), keys.member("b")}
        fresh_etcd.kill()
        assert entered.wait(10), "mirror did not notice the broken stream"
        fresh_etcd.restart()
        put(writer, keys.member("c"), "c")  # a join the mirror misses
        retry_call(lambda: writer.delete(keys.member("a")), what="delete", timeout=10)  # a leave
        for i in range(5):
            writer.put(keys.root + f"other/{i}", "x")  # history beyond our prefix too
        rev = writer.get_response(keys.member("c")).header.revision
        writer.compact(rev, physical=True)
        release.set()

        expected = {
            kv.key.decode(): kv.value for kv in writer.get_prefix_response(keys.members).kvs
        }
        wait_until(
            lambda: {k: v.value for k, v in mirror.snapshot().items()} == expected,
            10,
            "the mirror to match etcd after re-listing",
        )
        assert mirror.resyncs >= 1
        assert ("put", keys.member("c")) in seen
        assert ("delete", keys.member("a")) in seen
        assert set(expected) == {keys.member("b"), keys.member("c")}
    finally:
        release.set()
        mirror.close()


def test_embedded_etcd_is_stopped_when_its_context_exits_normally_or_by_error(
    tmp_path: Any,
) -> None:
    with EmbeddedEtcd(data_dir=str(tmp_path / "ok")) as server:
        pid = server.pid
        assert pid is not None and procs.alive(pid)
    assert not procs.alive(pid) and server.process is None

    with pytest.raises(RuntimeError, match="boom"):
        with EmbeddedEtcd(data_dir=str(tmp_path / "err")) as server:
            pid = server.pid
            assert procs.alive(pid)
            raise RuntimeError("boom")
    assert not procs.alive(pid)
