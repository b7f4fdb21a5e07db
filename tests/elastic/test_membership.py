"""Sessions, member records and mirrors against the session etcd."""

from __future__ import annotations

import time
from typing import Any

import pytest

from elastic.base.errors import ConfigError, SessionLostError
from elastic.coord.keys import Keyspace
from elastic.coord.membership import Member, PrefixMirror, Session, register_member
from elastic.coord.rendezvous import Rendezvous, RendezvousConfig
from tests.helpers.wait import wait_until


def test_session_ttl_is_the_ttl_etcd_granted(client: Any) -> None:
    with Session(client, ttl=1) as session:
        granted = client.get_lease_info(session.lease_id).grantedTTL
        assert granted >= 1
        assert session.ttl == granted  # etcd raises TTLs below its minimum (2 s)
        assert session.keepalive_interval <= session.ttl / 2
    with pytest.raises(ConfigError, match="ttl"):
        Session(client, ttl=0.5)


def test_closing_a_session_removes_its_keys_at_once(client: Any, keys: Keyspace) -> None:
    session = Session(client, ttl=2)
    register_member(client, keys, Member("m1", address="h:1"), session)
    record = Member.from_json(client.get(keys.member("m1"))[0])
    assert record.id == "m1" and record.address == "h:1" and record.registered_at > 0
    reasons: list[str] = []
    session.on_lost(reasons.append)
    session.close()
    assert client.get(keys.member("m1"))[0] is None  # no waiting for the TTL
    assert reasons == ["closed"] and session.lost.is_set()


def test_lease_revoked_behind_its_back_is_reported_lost(client: Any, keys: Keyspace) -> None:
    with Session(client, ttl=2) as session:
        reasons: list[str] = []
        session.on_lost(reasons.append)
        client.revoke_lease(session.lease_id)
        assert session.lost.wait(session.keepalive_interval + 2.0)
        # Callbacks run right after the event is set, on the keepalive thread.
        wait_until(lambda: reasons, 2.0, "the on_lost callback")
        assert reasons == [session.lost_reason] and "expired or was revoked" in reasons[0]
        with pytest.raises(SessionLostError, match="lost"):
            session.check()
        with pytest.raises(SessionLostError):
            register_member(client, keys, Member("late"), session)


def test_waiting_for_a_world_with_a_gone_lease_fails_at_once(client: Any, keys: Keyspace) -> None:
    # The keepalive is slow on purpose: the request itself must notice.
    session = Session(client, ttl=2, keepalive_interval=30)
    cfg = RendezvousConfig(lease_ttl=2, op_timeout=10)
    rdzv = Rendezvous(client, keys, Member("a"), cfg, session=session, lead=False).start()
    try:
        client.revoke_lease(session.lease_id)
        started = time.monotonic()
        with pytest.raises(SessionLostError, match="lease is gone"):
            rdzv.next_world(0, timeout=30)
        assert time.monotonic() - started < 2.0  # not the 10 s op_timeout
    finally:
        rdzv.close()
        session.close()


def test_mirror_reports_joins_and_leaves_and_bounded_waits(client: Any, keys: Keyspace) -> None:
    seen: list[tuple[str, str]] = []
    client.put(keys.member("old"), "1")
    mirror = PrefixMirror(
        client, keys.members, on_events=lambda evs: seen.extend((e.kind, e.key) for e in evs)
    )
    mirror.start()
    try:
        assert set(mirror.snapshot()) == {keys.member("old")}
        version = mirror.version
        client.put(keys.member("new"), "2")
        client.delete(keys.member("old"))
        client.put(keys.root + "elsewhere", "x")  # outside the prefix: not mirrored
        assert mirror.wait_for(lambda s: True if set(s) == {keys.member("new")} else None, 5)
        # The initial listing is reported too, then changes in etcd order.
        assert seen == [
            ("put", keys.member("old")),
            ("put", keys.member("new")),
            ("delete", keys.member("old")),
        ]
        assert mirror.version > version
        assert mirror.get(keys.member("new")).value == b"2"

        started = time.monotonic()
        assert mirror.wait_for(lambda s: None, 0.3) is None
        assert 0.3 <= time.monotonic() - started < 2.0
        assert mirror.resyncs == 0
    finally:
        mirror.close()
    wait_until(lambda: not mirror._thread.is_alive(), 2, "the mirror thread to end")
