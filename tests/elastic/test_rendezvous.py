"""Rendezvous against a real etcd: join storms, leaves, timeouts, compare-and-swap, fencing."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from elastic.base.errors import RendezvousTimeoutError
from elastic.coord.keys import Keyspace
from elastic.coord.membership import Member
from elastic.coord.rendezvous import Coordinator, Rendezvous, RendezvousConfig
from elastic.coord.world import World
from tests.helpers.sim import SimMember, WorldLog, check_history
from tests.helpers.wait import wait_until

STORM = 32
FAST = RendezvousConfig(lease_ttl=2, settle_s=0.3, op_timeout=10.0, last_call_s=30.0)


def converged(members: list[SimMember], log: WorldLog, size: int) -> bool:
    """Every member holds the newest World, and it has ``size`` members."""
    latest = log.current()
    if latest is None or latest.size != size:
        return False
    return all(m.current() == latest for m in members)


def errors(members: list[SimMember]) -> dict[str, str]:
    return {m.id: repr(m.error) for m in members if m.error is not None}


@pytest.fixture
def members_of(keys: Keyspace) -> Any:
    """Builds SimMembers; all still running leave at teardown."""
    made: list[SimMember] = []

    def build(clients: list[Any], ids: list[str], config: RendezvousConfig) -> list[SimMember]:
        new = [SimMember(clients[i % len(clients)], keys, mid, config) for i, mid in enumerate(ids)]
        made.extend(new)
        return new

    yield build
    for m in made:
        m.leave()


@pytest.fixture
def world_log(client: Any, keys: Keyspace) -> Any:
    log = WorldLog(client, keys)
    yield log
    log.close()


def test_join_storm_forms_one_world_per_generation_and_leaves_keep_order(
    etcd_url: str, make_client: Callable[[str], Any], members_of: Any, world_log: WorldLog
) -> None:
    clients = [make_client(etcd_url) for _ in range(4)]  # 8 members share a client
    members = members_of(clients, [f"m{i:02d}" for i in range(STORM)], FAST)
    barrier = threading.Barrier(STORM)
    for m in members:
        m.start(barrier)

    wait_until(
        lambda: converged(members, world_log, STORM) or errors(members),
        60,
        f"all {STORM} members to hold one World of {STORM}",
    )
    assert not errors(members)
    full = world_log.current()
    check_history(world_log, members, survivors={m.id for m in members})

    # The leader and five others leave at once; the rest re-form in their old order.
    leader = world_log.leader()
    leavers = {leader, "m03", "m11", "m17", "m24", "m31"} - {None}
    leavers = set(list(leavers)[:6]) if len(leavers) >= 6 else leavers | {"m05"}
    threads = [threading.Thread(target=m.leave) for m in members if m.id in leavers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    stayed = [m for m in members if m.id not in leavers]

    wait_until(
        lambda: converged(stayed, world_log, len(stayed)) or errors(stayed),
        60,
        f"{len(stayed)} survivors to hold one World",
    )
    assert not errors(stayed)
    final = world_log.current()
    assert final.generation > full.generation
    assert final.ids == tuple(m for m in full.ids if m not in leavers)
    assert world_log.leader() not in leavers
    check_history(world_log, members, survivors={m.id for m in stayed})


def test_min_workers_not_reached_times_out_naming_the_counts(client: Any, keys: Keyspace) -> None:
    cfg = RendezvousConfig(min_workers=3, lease_ttl=2, settle_s=0.0)
    with Rendezvous(client, keys, Member("only"), cfg) as rdzv:
        started = time.monotonic()
        with pytest.raises(RendezvousTimeoutError) as err:
            rdzv.next_world(0, timeout=1.0)
        elapsed = time.monotonic() - started
    msg = str(err.value)
    assert 1.0 <= elapsed < 5.0
    for part in (
        "within 1.0s",
        "min_workers=3",
        "1 member(s) alive",
        "1 ready",
        "current generation 0",
        "only",
    ):
        assert part in msg, f"{part!r} not in {msg!r}"


def test_world_for_an_existing_generation_or_from_a_non_leader_is_refused(
    client: Any, keys: Keyspace, world_log: WorldLog
) -> None:
    cfg = RendezvousConfig(lease_ttl=2, settle_s=0.0)
    with (
        Rendezvous(client, keys, Member("a"), cfg) as a,
        Rendezvous(client, keys, Member("b"), cfg, lead=False) as b,
    ):
        first = a.next_world(0, timeout=10)
        assert first.generation == 1
        members = {m: client.get_prefix_response(keys.member(m)).kvs[0] for m in ("a", "b")}
        # The leader again forming generation 1 (it exists already): refused.
        Coordinator(a)._form(0, ["b"], members)
        # A member that is not the leader forming generation 2: refused.
        Coordinator(b)._form(1, ["b"], members)
        # Both transactions have returned: etcd still holds the first World only.
        assert client.get(keys.gen)[0] == b"1"
        assert World.from_json(client.get(keys.world)[0]) == first
        assert [w.generation for w in world_log.worlds] == [1]
        # Control: the leader forming the next generation is accepted.
        Coordinator(a)._form(1, ["a", "b"], members)
        assert client.get(keys.gen)[0] == b"2"


def test_fenced_operations_of_a_stale_generation_are_refused(client: Any, keys: Keyspace) -> None:
    cfg = RendezvousConfig(lease_ttl=2, settle_s=0.0)
    tx = client.transactions
    with Rendezvous(client, keys, Member("a"), cfg) as a:
        g1 = a.next_world(0, timeout=10)
        assert a.fenced_txn(g1.generation, [tx.put(keys.root + "probe", "g1")])
        assert a.request_reform(g1.generation)
        g2 = a.next_world(g1.generation, timeout=10)
        assert g2.generation == g1.generation + 1

        assert not a.fenced_txn(g1.generation, [tx.put(keys.root + "probe", "stale")])
        assert not a.commit_fence(g1.generation)(5)
        assert not a.request_reform(g1.generation)
        assert client.get(keys.root + "probe")[0] == b"g1"
        assert client.get(keys.commit(5))[0] is None

        assert a.commit_fence(g2.generation)(5)
        record = json.loads(client.get(keys.commit(5))[0])
        assert record["generation"] == g2.generation and record["by"] == "a"


def test_standby_beyond_max_workers_joins_when_a_member_leaves(
    etcd_url: str, client: Any, members_of: Any, world_log: WorldLog
) -> None:
    cfg = RendezvousConfig(max_workers=2, lease_ttl=2, settle_s=0.1)
    a, b, c = members_of([client], ["a", "b", "c"], cfg)
    a.start()
    wait_until(lambda: a.current(), 10, "a to hold a World")
    b.start()
    wait_until(lambda: converged([a, b], world_log, 2), 10, "a World of a and b")
    c.start()
    wait_until(lambda: c.started.is_set(), 10, "c to register")
    assert c.current() is None  # no room: standby
    a.leave()
    wait_until(lambda: converged([b, c], world_log, 2), 15, "c to replace a")
    assert world_log.current().ids == ("b", "c")
    check_history(world_log, [a, b, c], survivors={"b", "c"})


def test_a_member_fenced_by_the_rendezvous_is_told_to_its_caller(
    client: Any, keys: Keyspace
) -> None:
    # The last-call eviction of a hung member happens in the coordination
    # layer; the job's event log learns of it through on_evict.
    told: list[tuple[str, str]] = []
    cfg = RendezvousConfig(lease_ttl=2, settle_s=0.0)
    with (
        Rendezvous(
            client, keys, Member("a"), cfg, on_evict=lambda m, why: told.append((m, why))
        ) as a,
        Rendezvous(client, keys, Member("b"), cfg, lead=False) as b,
    ):
        client.put(keys.lease_of("b"), str(b.session.lease_id))  # as the job records it
        a.evict("b", "hung")
        record = json.loads(client.get(keys.evicted + "b")[0])
        assert record["reason"] == "hung" and record["by"] == "a"
        assert told == [("b", "hung")]
        wait_until(lambda: b.session.lost.is_set(), 10, "b's lease revoked")
