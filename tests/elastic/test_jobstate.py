"""JobState: the one parser of a job's etcd keys (coordinator, `elastic status`, chaos)."""

from __future__ import annotations

import types
from typing import Any

from elastic.coord.jobstate import JobState, read_job_state
from elastic.coord.keys import Keyspace
from elastic.coord.membership import KeyValue, Member
from elastic.coord.world import World, WorldMember

KEYS = Keyspace("unit")


def kv(value: str | bytes, lease: int = 0) -> KeyValue:
    raw = value.encode() if isinstance(value, str) else value
    return KeyValue(raw, 1, 1, lease)


def job_keys() -> dict[str, KeyValue]:
    world = World(KEYS.job, 3, (WorldMember("a", "addr-a"), WorldMember("b", "addr-b")))
    return {
        KEYS.gen: kv("3"),
        KEYS.world: kv(world.to_json()),
        KEYS.leader: kv("a"),
        KEYS.member("a"): kv(Member("a").to_json(), lease=7),
        KEYS.member("c"): kv(Member("c").to_json(), lease=9),
        KEYS.ready_of("c"): kv("4"),
        KEYS.commit(9): kv("{}"),
        KEYS.commit(10): kv("{}"),
        KEYS.done: kv("12"),
    }


def test_the_keys_of_a_job_are_parsed_into_its_state() -> None:
    state = JobState.parse(job_keys(), KEYS)
    assert (state.generation, state.round, state.leader) == (3, 3, "a")
    assert state.world_ids == {"a", "b"}
    assert set(state.members) == {"a", "c"} and state.members["c"].lease == 9
    assert state.ready == {"c": 4}
    assert state.last_commit_step == 10 and state.finished_step == 12


def test_a_job_before_its_first_world_reads_as_generation_zero() -> None:
    state = JobState.parse({KEYS.member("a"): kv(Member("a").to_json())}, KEYS)
    assert (state.generation, state.round, state.world, state.leader) == (0, 0, None, None)
    assert state.world_ids == set() and state.last_commit_step is None
    assert state.finished_step is None


def test_a_foreign_key_under_commits_does_not_break_the_parse() -> None:
    snap = job_keys() | {KEYS.commits + "notes": kv("x")}
    assert JobState.parse(snap, KEYS).last_commit_step == 10


class FakeClient:
    def __init__(self, keys: dict[str, KeyValue]) -> None:
        self.keys = keys
        self.asked: list[str] = []

    def get_prefix_response(self, prefix: str) -> Any:
        self.asked.append(prefix)
        kvs = [
            types.SimpleNamespace(
                key=k.encode(),
                value=v.value,
                lease=v.lease,
                create_revision=v.create_revision,
                mod_revision=v.mod_revision,
            )
            for k, v in self.keys.items()
            if k.startswith(prefix)
        ]
        return types.SimpleNamespace(kvs=kvs)


def test_one_range_read_of_the_job_root_gives_the_same_state_as_the_mirror() -> None:
    client = FakeClient(job_keys() | {"/elastic/other/ctl/gen": kv("99")})
    assert read_job_state(client, KEYS) == JobState.parse(job_keys(), KEYS)
    assert client.asked == [KEYS.root]


def test_a_job_with_no_keys_in_etcd_reads_as_none() -> None:
    assert read_job_state(FakeClient({"/elastic/other/ctl/gen": kv("1")}), KEYS) is None
