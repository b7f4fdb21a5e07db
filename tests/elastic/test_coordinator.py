"""Coordinator.decide driven with synthetic snapshots: the World-forming rules as pure logic."""

from __future__ import annotations

import types
from typing import Any

import pytest
from etcd3.client import Transactions

from elastic.coord import rendezvous
from elastic.coord.keys import Keyspace
from elastic.coord.membership import KeyValue, Member
from elastic.coord.rendezvous import Coordinator, RendezvousConfig
from elastic.coord.world import World, WorldMember

KEYS = Keyspace("unit")
LEADER = "lead"


class FakeClient:
    """Records the transactions a coordinator sends; every one succeeds."""

    def __init__(self) -> None:
        self.transactions = Transactions()
        self.sent: list[tuple[list[Any], list[Any]]] = []

    def transaction(self, compare: list[Any], success: list[Any], failure: list[Any]) -> Any:
        self.sent.append((compare, success))
        return True, []

    def formed(self) -> list[World]:
        return [
            World.from_json(op.value) for _, ops in self.sent for op in ops if op.key == KEYS.world
        ]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    # Replace the module's view of `time` only: threads elsewhere keep the real clock.
    monkeypatch.setattr(
        rendezvous, "time", types.SimpleNamespace(monotonic=c.monotonic, time=lambda: 1.7e9)
    )
    return c


BROKEN: list[bool] = []  # the ``broken`` flag of every request_reform, in order
EVICTED: list[str] = []  # the members the coordinator fenced


def make(**cfg: Any) -> tuple[Coordinator, FakeClient, list[int]]:
    client, bumps = FakeClient(), []
    BROKEN.clear()
    EVICTED.clear()
    rdzv = types.SimpleNamespace(
        keys=KEYS,
        config=RendezvousConfig(**cfg),
        client=client,
        id=LEADER,
        request_reform=lambda gen, broken=False: bumps.append(gen) or BROKEN.append(broken) or True,
        # marking a World broken while a re-form is already being gathered
        fenced_txn=lambda gen, ops: BROKEN.append(True) or True,
        evict=lambda member, reason: EVICTED.append(member),
    )
    return Coordinator(rdzv), client, bumps  # type: ignore[arg-type]


def kv(value: str | bytes, rev: int = 1) -> KeyValue:
    raw = value.encode() if isinstance(value, str) else value
    return KeyValue(raw, rev, rev, 0)


def snapshot(
    members: dict[str, int],
    ready: dict[str, int] | None = None,
    world: list[str] | None = None,
    gen: int = 0,
    rnd: int | None = None,
) -> dict[str, KeyValue]:
    """``members``: id -> create revision (join order); ``ready``: id -> generation wanted."""
    snap = {KEYS.leader: kv(LEADER)}
    for mid, rev in members.items():
        snap[KEYS.member(mid)] = kv(Member(mid, address=f"addr-{mid}").to_json(), rev)
    for mid, want in (ready or {}).items():
        snap[KEYS.ready_of(mid)] = kv(str(want))
    if world is not None:
        w = World(KEYS.job, gen, tuple(WorldMember(m, f"addr-{m}") for m in world))
        snap[KEYS.world] = kv(w.to_json())
        snap[KEYS.gen] = kv(str(gen))
        snap[KEYS.round] = kv(str(gen if rnd is None else rnd))
    return snap


def test_first_world_waits_for_min_workers(clock: Clock) -> None:
    coord, client, _ = make(min_workers=2, settle_s=0.0)
    assert coord.decide(snapshot({"a": 5}, ready={"a": 1})) is None
    assert client.sent == []
    coord.decide(snapshot({"a": 5, "b": 6}, ready={"a": 1, "b": 1}))
    assert [w.ids for w in client.formed()] == [("a", "b")]


def test_first_world_waits_for_the_settle_window_then_ranks_by_join_order(clock: Clock) -> None:
    coord, client, _ = make(settle_s=0.3)
    # "z" joined first (lower create revision): rank order is join order, not id order.
    snap = snapshot({"z": 5, "a": 9}, ready={"z": 1, "a": 1})
    wait = coord.decide(snap)
    assert wait == pytest.approx(0.3) and client.sent == []
    clock.now += 0.31
    coord.decide(snap)
    (world,) = client.formed()
    assert world.generation == 1 and world.ids == ("z", "a")
    assert world.members[0].address == "addr-z"


def test_ready_keys_of_members_whose_lease_expired_are_ignored(clock: Clock) -> None:
    coord, client, _ = make(min_workers=2, settle_s=0.0)
    # "ghost" has a ready key but no member record: its lease is gone.
    assert coord.decide(snapshot({"a": 5}, ready={"a": 1, "ghost": 1})) is None
    assert client.sent == []


def test_form_transaction_compares_leadership_and_generation(clock: Clock) -> None:
    coord, client, _ = make(settle_s=0.0)
    coord.decide(snapshot({"a": 5, "b": 6}, ready={"a": 2, "b": 2}, world=["a"], gen=1, rnd=2))
    ((compare, success),) = client.sent
    checks = {(c.key, c.value) for c in compare}
    assert (KEYS.leader, LEADER.encode()) in checks  # a deposed leader cannot write
    assert (KEYS.gen, b"1") in checks  # two Worlds of one generation cannot exist
    written = {op.key: op.value for op in success}
    assert written[KEYS.gen] == "2" and written[KEYS.round] == "2"


def test_departed_member_requests_one_reform(clock: Clock) -> None:
    coord, client, bumps = make()
    snap = snapshot({"a": 1, "b": 2}, ready={"a": 1, "b": 1, "c": 1}, world=["a", "b", "c"], gen=1)
    assert coord.decide(snap) is None
    assert coord.decide(snap) is None  # the bump is on its way: no second request
    assert bumps == [1] and client.sent == []
    # A member is gone: the World is broken, so members blocked in a
    # collective with it stop waiting.
    assert BROKEN == [True]


def test_settled_joiner_requests_reform_only_when_there_is_room(clock: Clock) -> None:
    coord, _, bumps = make(settle_s=0.5)
    snap = snapshot({"a": 1, "b": 2, "j": 3}, ready={"j": 2}, world=["a", "b"], gen=1)
    assert coord.decide(snap) == pytest.approx(0.5)
    assert bumps == []
    clock.now += 0.6
    coord.decide(snap)
    assert bumps == [1]
    assert BROKEN == [False]  # a joiner breaks nothing: running collectives complete

    full, _, full_bumps = make(settle_s=0.0, max_workers=2)
    assert full.decide(snap) is None
    assert full_bumps == []  # no room: the joiner waits as a standby


def test_next_world_keeps_survivor_order_then_adds_joiners_in_join_order(clock: Clock) -> None:
    coord, client, _ = make(settle_s=0.0)
    snap = snapshot(
        {"c": 1, "a": 2, "b": 3, "x": 4, "e": 20, "d": 21},
        ready={"c": 2, "a": 2, "b": 2, "e": 2, "d": 2},
        world=["c", "a", "x", "b"],
        gen=1,
        rnd=2,  # x left: its member key is gone below
    )
    del snap[KEYS.member("x")]
    coord.decide(snap)
    (world,) = client.formed()
    assert world.generation == 2
    assert world.ids == ("c", "a", "b", "e", "d")
    assert [world.rank_of(m) for m in world.ids] == [0, 1, 2, 3, 4]


def test_leftover_ready_key_of_a_world_member_does_not_count(clock: Clock) -> None:
    coord, client, _ = make(settle_s=0.0, last_call_s=10.0)
    # "b" announced readiness for generation 2, which it already holds: it has
    # not come to the rendezvous for generation 3 yet.
    snap = snapshot({"a": 1, "b": 2}, ready={"a": 3, "b": 2}, world=["a", "b"], gen=2, rnd=3)
    assert coord.decide(snap) == pytest.approx(10.0)
    assert client.sent == []


def test_absent_survivor_is_left_out_after_last_call(clock: Clock) -> None:
    coord, client, _ = make(settle_s=0.0, last_call_s=10.0)
    snap = snapshot({"a": 1, "b": 2}, ready={"a": 3}, world=["a", "b"], gen=2, rnd=3)
    assert coord.decide(snap) == pytest.approx(10.0)
    clock.now += 4.0
    assert coord.decide(snap) == pytest.approx(6.0)
    clock.now += 6.5
    coord.decide(snap)
    (world,) = client.formed()
    assert world.ids == ("a",) and world.generation == 3
    assert EVICTED == ["b"]  # fenced: its launcher replaces it


def test_a_member_left_out_does_not_come_back_on_its_old_ready_key(clock: Clock) -> None:
    # The loop a soak hit: "b" hangs (lease alive) in World 2; World 3 forms
    # without it; had it not been fenced, its ready key for 2 made it a ready
    # joiner of World 4, which then waited the collective timeout for it.
    coord, client, _ = make(settle_s=0.0, last_call_s=10.0)
    snap = snapshot({"a": 1, "b": 2}, ready={"a": 3, "b": 2}, world=["a", "b"], gen=2, rnd=3)
    coord.decide(snap)
    clock.now += 10.5
    coord.decide(snap)
    assert [w.ids for w in client.formed()] == [("a",)]
    assert EVICTED == ["b"]


def test_nobody_is_evicted_when_every_survivor_comes(clock: Clock) -> None:
    coord, client, _ = make(settle_s=0.0, last_call_s=10.0)
    snap = snapshot({"a": 1, "b": 2}, ready={"a": 3, "b": 3}, world=["a", "b"], gen=2, rnd=3)
    coord.decide(snap)
    assert [w.ids for w in client.formed()] == [("a", "b")]
    assert EVICTED == []


def test_gathered_world_respects_max_and_min_workers(clock: Clock) -> None:
    coord, client, _ = make(settle_s=0.0, max_workers=3)
    snap = snapshot(
        {"a": 1, "b": 2, "c": 3, "d": 4},
        ready={"a": 2, "b": 2, "c": 2, "d": 2},
        world=["b", "a"],
        gen=1,
        rnd=2,
    )
    coord.decide(snap)
    assert [w.ids for w in client.formed()] == [("b", "a", "c")]  # "d" waits as standby

    coord, client, _ = make(settle_s=0.0, min_workers=3, last_call_s=1.0)
    snap = snapshot({"a": 1, "b": 2}, ready={"a": 2}, world=["a", "b"], gen=1, rnd=2)
    clock.now += 2.0
    coord.decide(snap)  # sets the last-call clock
    clock.now += 2.0
    assert coord.decide(snap) is None
    assert client.sent == []  # one ready member < min_workers: no World


def test_first_world_waits_for_initial_workers_until_last_call(clock: Clock) -> None:
    coord, client, _ = make(settle_s=0.0, initial_workers=3, last_call_s=5.0)
    snap = snapshot({"a": 1, "b": 2}, ready={"a": 1, "b": 1})
    assert coord.decide(snap) == pytest.approx(5.0)
    assert client.sent == []
    clock.now += 5.1
    coord.decide(snap)
    assert [w.ids for w in client.formed()] == [("a", "b")]
