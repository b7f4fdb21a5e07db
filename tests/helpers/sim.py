"""Simulated members: a Rendezvous followed on a thread, recording every World it holds."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from elastic.base.errors import ElasticError
from elastic.coord.keys import Keyspace
from elastic.coord.membership import Member, MirrorEvent, PrefixMirror, Session
from elastic.coord.rendezvous import Rendezvous, RendezvousConfig
from elastic.coord.world import World


class SimMember:
    """Joins, then for each World: record it, wait for a re-form request, come back.

    This is what a training worker does between steps, minus the training.
    ``on_world`` / ``on_error`` let a process report events as they happen.
    """

    def __init__(
        self,
        client: Any,
        keys: Keyspace,
        member_id: str,
        config: RendezvousConfig,
        *,
        session: Session | None = None,
        world_timeout: float = 60.0,
        on_world: Callable[[World], None] | None = None,
        on_error: Callable[[ElasticError], None] | None = None,
    ) -> None:
        self.rdzv = Rendezvous(
            client, keys, Member(member_id, address=f"host-{member_id}"), config, session=session
        )
        self.worlds: list[World] = []
        self.error: BaseException | None = None
        self.world_timeout = world_timeout
        self.on_world = on_world
        self.on_error = on_error
        self.started = threading.Event()
        self._leaving = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sim-{member_id}", daemon=True)

    @property
    def id(self) -> str:
        return self.rdzv.id

    def start(self, barrier: threading.Barrier | None = None) -> SimMember:
        self._barrier = barrier
        self._thread.start()
        return self

    def current(self) -> World | None:
        return self.worlds[-1] if self.worlds else None

    def _run(self) -> None:
        after = 0
        try:
            if self._barrier is not None:
                self._barrier.wait(timeout=30)
            self.rdzv.start()
            self.started.set()
            while not self._leaving.is_set():
                world = self.rdzv.next_world(after, timeout=self.world_timeout)
                self.worlds.append(world)
                if self.on_world is not None:
                    self.on_world(world)
                after = world.generation
                while not self._leaving.is_set():
                    self.rdzv.session.check()
                    if self.rdzv.ctl.wait_for(
                        lambda _s, g=after: True if self.rdzv.reform_pending(g) else None,
                        timeout=0.5,
                        wake=self._leaving,
                    ):
                        break
        except ElasticError as exc:
            if not self._leaving.is_set():
                self.error = exc
                if self.on_error is not None:
                    self.on_error(exc)
        except BaseException as exc:  # surfaces in the test instead of dying silently
            self.error = exc
            raise

    def leave(self, timeout: float = 10.0) -> None:
        """Leave the job (lease revoked: its keys vanish at once) and stop the thread."""
        self._leaving.set()
        self.rdzv.close()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise AssertionError(f"member {self.id} did not stop within {timeout:.0f}s")


class WorldLog:
    """Every World record written to a job, in etcd order, seen through a watch."""

    def __init__(self, client: Any, keys: Keyspace) -> None:
        self.keys = keys
        self.worlds: list[World] = []
        self.gens: list[int] = []
        self.mirror = PrefixMirror(client, keys.ctl, on_events=self._record).start()

    def _record(self, events: list[MirrorEvent]) -> None:
        for ev in events:
            if ev.kind == "put" and ev.value is not None:
                if ev.key == self.keys.world:
                    self.worlds.append(World.from_json(ev.value.value))
                elif ev.key == self.keys.gen:
                    self.gens.append(int(ev.value.value))

    def current(self) -> World | None:
        return self.worlds[-1] if self.worlds else None

    def leader(self) -> str | None:
        kv = self.mirror.get(self.keys.leader)
        return kv.value.decode() if kv is not None else None

    def close(self) -> None:
        self.mirror.close()


def check_history(log: WorldLog, members: list[SimMember], survivors: set[str]) -> None:
    """The rendezvous invariants over everything that was written and observed.

    * one World per generation, generations strictly increasing from 1;
    * every member that saw generation G saw the same World (the one in etcd)
      and is in it; every member still alive saw every generation it is in;
    * ranks are 0..size-1 with no member twice;
    * members in two consecutive Worlds keep their relative order.
    """
    gens = [w.generation for w in log.worlds]
    assert gens == list(range(1, len(gens) + 1)), f"World generations written: {gens}"
    assert log.gens == gens, f"ctl/gen written {log.gens}, Worlds {gens}"
    by_gen = {w.generation: w for w in log.worlds}
    for m in members:
        seen = [w.generation for w in m.worlds]
        assert seen == sorted(set(seen)), f"{m.id} saw generations {seen}"
        for w in m.worlds:
            assert w == by_gen[w.generation], f"{m.id} saw a different World {w.generation}"
            assert m.id in w.ids
    for g, w in by_gen.items():
        assert len(set(w.ids)) == w.size, f"generation {g} lists a member twice: {w.ids}"
        observers = {m.id for m in members if any(x.generation == g for x in m.worlds)}
        missing = (set(w.ids) & survivors) - observers
        assert not missing, f"generation {g}: members {missing} never saw it"
        ranks = sorted(w.rank_of(mid) for mid in observers)
        if observers == set(w.ids):
            assert ranks == list(range(w.size)), f"generation {g} ranks {ranks}"
    for prev, nxt in zip(log.worlds, log.worlds[1:], strict=False):
        common = [m for m in prev.ids if m in nxt.ids]
        assert [m for m in nxt.ids if m in common] == common, (
            f"survivors reordered from generation {prev.generation} to {nxt.generation}"
        )
