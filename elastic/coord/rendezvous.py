"""Generation-numbered Worlds formed by etcd compare-and-swap.

Protocol (keys in :mod:`elastic.coord.keys`):

* Every member holds a :class:`~elastic.coord.membership.Session` and a member record
  under its lease, and mirrors only ``ctl/`` (generation, World, round, leader):
  O(1) watch events per World whatever the job size.
* One member at a time is the *leader* (``ctl/leader``, created with a
  version==0 compare under its lease; a dead or frozen leader's key expires and
  the others campaign again). Only the leader mirrors the member and ready sets.
* A member that wants into the next World writes ``ready/{id} = N`` ("any World
  with generation >= N"). A re-form is requested by bumping ``ctl/round`` to
  G+1: members do it when a collective fails, the leader does it when a member
  of the World has left or when joiners have settled. Running members see the
  bump at their next step boundary and come to the rendezvous.
* The leader forms G+1 once every surviving member is ready (a live member that
  stays away longer than ``last_call_s`` is left out), with survivors in their
  old order followed by joiners in join order, capped at ``max_workers`` (the
  rest wait as standbys). It writes the World with one transaction comparing
  the generation and its own leadership: two Worlds with one generation cannot
  exist, and a deposed leader cannot write.
* ``ctl/gen`` is the fencing token: :meth:`Rendezvous.fenced_txn` runs etcd
  operations only if a generation is still current.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..base.errors import (
    ConfigError,
    ElasticError,
    EtcdUnavailableError,
    JobEnded,
    RendezvousTimeoutError,
    SessionLostError,
)
from .etcd import retry_call
from .hangs import evict
from .jobstate import JobState, int_value, read_world
from .keys import Keyspace
from .membership import (
    LEASE_TTL_S,
    KeyValue,
    Member,
    PrefixMirror,
    Session,
    register_member,
    shared_mirrors,
)
from .world import World, WorldMember

log = logging.getLogger(__name__)
_GONE = object()  # a wait ended because this member left or lost its session
MAX_WORKERS = 1 << 16  # no cap (--max-workers not given)


@dataclass(frozen=True)
class RendezvousConfig:
    """How Worlds are formed.

    ``settle_s``: quiet period after the last join before a World is formed, so
    a burst of joins makes one generation. ``last_call_s``: how long the leader
    waits for a live member of the old World that does not come to the
    rendezvous (a slow step is not a reason to evict; a hang is).
    """

    min_workers: int = 1
    max_workers: int = MAX_WORKERS
    # The first World waits (up to last_call_s) for this many members, so a
    # job started with N workers does not begin with whoever came first.
    initial_workers: int = 0
    settle_s: float = 0.3
    last_call_s: float = 60.0
    lease_ttl: float = LEASE_TTL_S
    op_timeout: float = 10.0
    outage_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.min_workers, int) or self.min_workers < 1:
            raise ConfigError(f"min_workers must be an integer >= 1, got {self.min_workers!r}")
        if not isinstance(self.max_workers, int) or self.max_workers < self.min_workers:
            raise ConfigError(
                f"max_workers ({self.max_workers!r}) must be >= min_workers ({self.min_workers})"
            )
        if self.initial_workers < 0 or self.initial_workers > self.max_workers:
            raise ConfigError(
                f"initial_workers ({self.initial_workers}) must be between 0 and "
                f"max_workers ({self.max_workers})"
            )
        if self.settle_s < 0:
            raise ConfigError(f"settle_s must be >= 0, got {self.settle_s}")
        for name in ("last_call_s", "lease_ttl", "op_timeout", "outage_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.lease_ttl < 1:
            raise ConfigError(f"lease_ttl must be >= 1 second, got {self.lease_ttl}")


class Rendezvous:
    """One member's handle on a job's rendezvous."""

    def __init__(
        self,
        client: Any,
        keys: Keyspace,
        member: Member,
        config: RendezvousConfig | None = None,
        *,
        session: Session | None = None,
        lead: bool = True,
        on_evict: Callable[[str, str], None] | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.member = member
        self.config = config or RendezvousConfig()
        # Told of each member this one fences (member, reason): the coordination
        # layer has no event log of its own.
        self.on_evict = on_evict
        self._own_session = session is None
        self.session = session
        self.lead = lead
        self.ctl: PrefixMirror | None = None
        self._closed = threading.Event()
        self._campaigner: threading.Thread | None = None
        self.coordinator: Coordinator | None = None

    @property
    def id(self) -> str:
        return self.member.id

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Rendezvous:
        cfg = self.config
        if self.session is None:
            self.session = Session(self.client, cfg.lease_ttl, op_timeout=cfg.op_timeout)
        register_member(self.client, self.keys, self.member, self.session, cfg.op_timeout)
        self.ctl = shared_mirrors.acquire(
            self.client,
            self.keys.ctl,
            outage_timeout=cfg.outage_timeout,
            op_timeout=cfg.op_timeout,
        )
        self.session.on_lost(lambda _reason: self.ctl.notify() if self.ctl else None)
        if self.lead:
            self._campaigner = threading.Thread(
                target=self._campaign_loop, name=f"campaign-{self.id}", daemon=True
            )
            self._campaigner.start()
        return self

    def close(self) -> None:
        """Leave the job: revoking the lease removes member, ready and leader keys."""
        self._closed.set()
        if self.coordinator is not None:
            self.coordinator.stop()
        if self.ctl is not None:
            self.ctl.notify()
        if self._campaigner is not None:
            self._campaigner.join(timeout=5.0)
        if self.session is not None and self._own_session:
            self.session.close()
        if self.ctl is not None:
            shared_mirrors.release(self.ctl)

    def __enter__(self) -> Rendezvous:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what members call ---------------------------------------------------

    def current(self) -> World | None:
        return read_world(self.ctl.snapshot(), self.keys)

    def generation(self) -> int:
        """The current generation (a local read of the mirrored ``ctl/gen``)."""
        return int_value(self.ctl.get(self.keys.gen))

    def reform_pending(self, generation: int) -> bool:
        """True once a World newer than ``generation`` is formed or being gathered.

        A local read of the mirrored ``ctl/`` keys: cheap enough for every step.
        """
        snap = self.ctl.snapshot()
        return (
            max(int_value(snap.get(self.keys.round)), int_value(snap.get(self.keys.gen)))
            > generation
        )

    def job_flag(self, name: str) -> bool:
        """Whether ``ctl/stop`` or ``ctl/done`` is set (a local read)."""
        return self.ctl.get(getattr(self.keys, name)) is not None

    def request_reform(self, generation: int, broken: bool = False) -> bool:
        """Ask for World ``generation + 1``.

        ``broken``: the World cannot complete another collective (a member is
        gone, a collective failed), so members blocked in one stop waiting
        (see :meth:`world_broken`); a re-form for joiners leaves them be.
        """
        tx = self.client.transactions
        ops = [tx.put(self.keys.round, str(generation + 1))]
        if broken:
            ops.append(tx.put(self.keys.broken, str(generation)))
        return self.fenced_txn(generation, ops)

    def world_broken(self, generation: int) -> str | None:
        """Why World ``generation`` can no longer complete a collective, or None.

        Local reads of the mirrored ``ctl/`` keys: cheap enough to poll while a
        collective is pending.
        """
        return self._broken_in(self.ctl.snapshot(), generation)

    def _broken_in(self, snap: dict[str, KeyValue], generation: int) -> str | None:
        if self.session.lost.is_set():
            return f"member {self.id} lost its lease"
        if int_value(snap.get(self.keys.gen)) > generation:
            return f"generation {int_value(snap.get(self.keys.gen))} formed"
        if int_value(snap.get(self.keys.broken), -1) >= generation:
            return f"generation {generation} lost a member"
        return None

    def await_members(
        self, world: World, timeout: float, hang_bound_s: float | None = None
    ) -> str | None:
        """Wait until every member of ``world`` reached its group formation;
        returns None then, else why not (the World broke, the wait timed out).

        Forming a process group blocks in TCPStore and gloo calls that no
        watch can interrupt (a store op to a frozen peer blocks past its own
        timeout, measured). Meeting here first, in etcd under the membership
        watch, leaves only the formation itself (milliseconds once every
        member is there) unwatched: a member frozen or dead before it arrived
        costs the lease TTL, not the collective timeout.

        ``hang_bound_s``: a member whose lease lives but that has not arrived
        this long after us (its training thread hung) is evicted, as a rank
        missing from a step's all-reduce is (``coord.hangs``); the lowest-ranked
        arrived member acts, the others a second later if it did not.
        """
        gen = world.generation
        if self.session.lost.is_set():
            return f"member {self.id} lost its lease"
        try:
            retry_call(
                lambda: self.client.put(
                    self.keys.arrived_of(self.id), str(gen), lease=self.session.lease_id
                ),
                what=f"announcing arrival at generation {gen}",
                timeout=self.config.op_timeout,
            )
        except (EtcdUnavailableError, SessionLostError) as exc:
            return f"cannot announce arrival: {exc}"

        def arrived(mid: str, snap: dict[str, KeyValue]) -> bool:
            return int_value(snap.get(self.keys.arrived_of(mid)), -1) >= gen

        def ready(snap: dict[str, KeyValue]) -> str | bool | None:
            if self._closed.is_set():
                return f"member {self.id} left the job"
            broken = self._broken_in(snap, gen)
            if broken is not None:
                return broken
            return True if all(arrived(m, snap) for m in world.ids) else None

        t0 = time.monotonic()
        deadline = t0 + timeout
        evicted: set[str] = set()
        while True:
            now = time.monotonic()
            wait = deadline - now
            if hang_bound_s is not None:
                # Wake at the bound, then every half second to judge again.
                wait = min(wait, max(t0 + hang_bound_s - now, 0.5))
            # No polling: a lost session and close() notify the ctl mirror.
            got = self.ctl.wait_for(ready, max(wait, 0.0))
            if got is True:
                return None
            if got is not None:
                return str(got)
            waited = time.monotonic() - t0
            snap = self.ctl.snapshot()
            missing = [m for m in world.ids if not arrived(m, snap)]
            if waited >= timeout:
                return (
                    f"member(s) {missing} of generation {gen} did not reach its formation "
                    f"within {timeout:.1f}s"
                )
            if hang_bound_s is None or waited < hang_bound_s:
                continue
            here = [world.rank_of(m) for m in world.ids if arrived(m, snap)]
            if world.rank_of(self.id) != min(here, default=-1) and waited < hang_bound_s + 1.0:
                continue
            reason = (
                f"did not reach the formation of generation {gen} within "
                f"{hang_bound_s:.1f}s of its peers"
            )
            for mid in missing:
                if mid not in evicted:
                    try:
                        self.evict(mid, reason)
                    except ElasticError as exc:
                        # etcd trouble is no verdict; the wait's own bound applies.
                        log.warning("evicting %s at formation failed: %s", mid, exc)
                        continue
                    evicted.add(mid)

    def next_world(self, after: int = 0, timeout: float = 300.0) -> World:
        """Block until a World newer than ``after`` that includes this member forms."""
        self.session.check()
        retry_call(
            lambda: self.client.put(
                self.keys.ready_of(self.id), str(after + 1), lease=self.session.lease_id
            ),
            what="announcing readiness",
            timeout=self.config.op_timeout,
        )

        def mine(snap: dict[str, KeyValue]) -> World | str | object | None:
            if self.session.lost.is_set() or self._closed.is_set():
                return _GONE
            for reason, key in (("finished", self.keys.done), ("stopped", self.keys.stop)):
                if key in snap:
                    return reason
            world = read_world(snap, self.keys)
            if world is not None and world.generation > after and self.id in world.ids:
                return world
            return None

        # No polling: losing the session and close() both notify the ctl mirror.
        world = self.ctl.wait_for(mine, timeout)
        if world is _GONE:
            world = None
        if isinstance(world, str):
            raise JobEnded(world)
        if world is not None:
            return world
        self.session.check()
        if self._closed.is_set():
            raise SessionLostError(f"member {self.id} left the job while waiting for a World")
        raise RendezvousTimeoutError(self._timeout_message(after, timeout))

    def _timeout_message(self, after: int, timeout: float) -> str:
        try:
            live = len(list(self.client.get_prefix(self.keys.members, keys_only=True)))
            ready = len(list(self.client.get_prefix(self.keys.ready, keys_only=True)))
            counts = f"{live} member(s) alive, {ready} ready"
        except Exception as exc:  # the counts are a courtesy; the timeout is the error
            counts = f"member counts unavailable ({exc!r})"
        world = self.current()
        return (
            f"no World including {self.id} formed within {timeout:.1f}s (after generation "
            f"{after}): min_workers={self.config.min_workers}, "
            f"max_workers={self.config.max_workers}, {counts}; current generation "
            f"{world.generation if world else 0}"
        )

    def evict(self, member_id: str, reason: str) -> None:
        """Fence a member out of the job (its lease revoked); its launcher kills it."""
        evict(self.client, self.keys, member_id, reason, by=self.id, timeout=self.config.op_timeout)
        if self.on_evict is not None:
            self.on_evict(member_id, reason)

    def fenced_txn(self, generation: int, ops: Sequence[Any]) -> bool:
        """Run ``ops`` in one etcd transaction only if ``generation`` is current."""
        tx = self.client.transactions
        cmp = (
            [tx.version(self.keys.gen) == 0]
            if generation == 0
            else [tx.value(self.keys.gen) == str(generation).encode()]
        )
        ok, _ = retry_call(
            lambda: self.client.transaction(compare=cmp, success=list(ops), failure=[]),
            what=f"fenced transaction for generation {generation}",
            timeout=self.config.op_timeout,
        )
        return bool(ok)

    def commit_record(self, step: int, generation: int) -> str:
        """The value of ``commits/{step}``: which member committed it under which generation."""
        return json.dumps(
            {"step": step, "generation": generation, "by": self.id, "at": time.time()}
        )

    def commit_fence(self, generation: int) -> Callable[[int], bool]:
        """A checkpoint fence: records commit of ``step`` iff ``generation`` is current."""

        def fence(step: int) -> bool:
            record = self.commit_record(step, generation)
            return self.fenced_txn(
                generation, [self.client.transactions.put(self.keys.commit(step), record)]
            )

        return fence

    # -- leadership ------------------------------------------------------------

    def _leaving(self) -> bool:
        return self._closed.is_set() or self.session.lost.is_set()

    def _campaign_loop(self) -> None:
        tx = self.client.transactions
        # The waits below need no polling: close() and a lost session notify
        # the ctl mirror, and the predicates check for both.
        while not self._leaving():
            try:
                vacant = self.ctl.wait_for(
                    lambda s: True if self._leaving() or self.keys.leader not in s else None,
                    timeout=self.config.op_timeout,
                )
                if not vacant or self._leaving():
                    continue
                won, _ = retry_call(
                    lambda: self.client.transaction(
                        compare=[tx.version(self.keys.leader) == 0],
                        success=[tx.put(self.keys.leader, self.id, lease=self.session.lease_id)],
                        failure=[],
                    ),
                    what="campaigning for leader",
                    timeout=self.config.op_timeout,
                )
                if won:
                    log.info("member %s leads job %s", self.id, self.keys.job)
                    self.coordinator = Coordinator(self)
                    self.coordinator.run()
                    self.coordinator = None
                else:
                    # Someone else won: wait until our mirror shows their key
                    # instead of campaigning again on a stale view.
                    self.ctl.wait_for(
                        lambda s: True if self._leaving() or self.keys.leader in s else None,
                        timeout=self.config.op_timeout,
                    )
            except (EtcdUnavailableError, SessionLostError) as exc:
                log.warning("member %s campaign interrupted: %s", self.id, exc)
                self._closed.wait(0.5)


class Coordinator:
    """The leader's loop: watches members and readiness, forms Worlds."""

    def __init__(self, rdzv: Rendezvous) -> None:
        self.rdzv = rdzv
        self.keys = rdzv.keys
        self.cfg = rdzv.config
        self.client = rdzv.client
        self._stop = threading.Event()
        self._live_seen: frozenset[str] = frozenset()
        self._live_changed_at = time.monotonic()
        self._gather_gen = -1
        self._gather_since = 0.0
        self._bumped = -1
        self._broke = -1
        self._first_ready_at: float | None = None
        self.worlds_formed = 0

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        mirror = PrefixMirror(
            self.client,
            self.keys.root,
            outage_timeout=self.cfg.outage_timeout,
            op_timeout=self.cfg.op_timeout,
        ).start()
        try:
            seen = [-1]

            def changed(_snap: object) -> bool | None:
                return True if mirror.version != seen[0] else None

            wait: float | None = 0.0
            while not self._stop.is_set() and not self.rdzv._closed.is_set():
                if self.rdzv.session.lost.is_set():
                    return
                # Block until the mirror changes or the settle/last-call timer
                # is due; the 0.5 s cap re-checks leadership and stop flags.
                mirror.wait_for(
                    changed,
                    timeout=0.5 if wait is None else max(0.0, min(wait, 0.5)),
                    wake=self._stop,
                )
                seen[0] = mirror.version
                snap = mirror.snapshot()
                leader = snap.get(self.keys.leader)
                if leader is None or leader.value.decode() != self.rdzv.id:
                    log.info("member %s is no longer leader", self.rdzv.id)
                    return
                wait = self.decide(snap)
        except (EtcdUnavailableError, SessionLostError) as exc:
            log.warning("coordinator of %s stopped: %s", self.rdzv.id, exc)
        finally:
            mirror.close()

    def decide(self, snap: dict[str, KeyValue]) -> float | None:
        """One evaluation; returns seconds until the next one is due (None: on change)."""
        keys, cfg = self.keys, self.cfg
        state = JobState.parse(snap, keys)
        gen, world, rnd, live = state.generation, state.world, state.round, state.members
        ready = {mid: r for mid, r in state.ready.items() if mid in live}
        in_world = state.world_ids

        def is_ready(mid: str) -> bool:
            # A member of World G is ready only for a rendezvous it started
            # after G formed; its older ready key is a leftover.
            r = ready.get(mid)
            return r is not None and (mid not in in_world or r > gen)

        survivors = [m for m in (world.ids if world else ()) if m in live]
        departed = [m for m in (world.ids if world else ()) if m not in live]
        joiners = sorted(
            (m for m in live if m not in in_world), key=lambda m: (live[m].create_revision, m)
        )
        ready_joiners = [m for m in joiners if is_ready(m)]

        now = time.monotonic()
        live_set = frozenset(live)
        if live_set != self._live_seen:
            self._live_seen = live_set
            self._live_changed_at = now
        settle_left = self._live_changed_at + cfg.settle_s - now

        if world is None:
            if len(ready_joiners) < cfg.min_workers:
                self._first_ready_at = None
                return None
            if self._first_ready_at is None:
                self._first_ready_at = now
            want = max(cfg.min_workers, cfg.initial_workers)
            if len(ready_joiners) < want:
                left = self._first_ready_at + cfg.last_call_s - now
                if left > 0:
                    return left
                log.warning(
                    "forming the first World with %d of %d initial workers after %.1fs",
                    len(ready_joiners),
                    want,
                    cfg.last_call_s,
                )
            if settle_left > 0:
                return settle_left
            return self._form(gen, ready_joiners[: cfg.max_workers], live)

        if rnd <= gen:
            if self._bumped == gen:
                return None  # our bump is on its way to the mirror
            room = len(survivors) < cfg.max_workers
            if departed:
                log.info("generation %d lost %s: re-forming", gen, departed)
            elif ready_joiners and room:
                if settle_left > 0:
                    return settle_left
                log.info("generation %d: %d joiner(s) settled: re-forming", gen, len(ready_joiners))
            else:
                return None
            self._bumped = gen
            self.rdzv.request_reform(gen, broken=bool(departed))
            return None

        # Gathering World gen+1 (asked for by a joiner or a member). A member
        # that departs now must still unblock survivors waiting on it.
        if departed and int_value(snap.get(keys.broken), -1) < gen and self._broke != gen:
            self._broke = gen
            tx = self.client.transactions
            self.rdzv.fenced_txn(gen, [tx.put(keys.broken, str(gen))])
        if self._gather_gen != gen:
            self._gather_gen, self._gather_since = gen, now
        absent = [m for m in survivors if not is_ready(m)]
        if absent:
            left = self._gather_since + cfg.last_call_s - now
            if left > 0:
                return left
            log.warning(
                "forming generation %d without %s: not ready within %.1fs",
                gen + 1,
                absent,
                cfg.last_call_s,
            )
        if ready_joiners and settle_left > 0:
            return settle_left
        chosen = [m for m in survivors if is_ready(m)] + ready_joiners
        chosen = chosen[: cfg.max_workers]
        if len(chosen) < cfg.min_workers:
            return None
        formed = self.worlds_formed
        wait = self._form(gen, chosen, live)
        if absent and self.worlds_formed > formed:
            # Left out is not enough: a member whose training thread hangs keeps
            # its lease alive, its old ready key would make it a "ready joiner"
            # of the next World, and every World with it would wait out the
            # collective timeout for it (a soak looped so, 120 s per step).
            # Absent for the whole last call is a hang: fence it, and its
            # launcher replaces it. The leader itself may be the hung one (its
            # coordinator thread lives on): it forms the World, then fences itself.
            for m in absent:
                self.rdzv.evict(
                    m, f"not at the rendezvous of generation {gen + 1} within {cfg.last_call_s:g}s"
                )
        return wait

    def _form(self, gen: int, chosen: list[str], live: dict[str, KeyValue]) -> float | None:
        keys, tx = self.keys, self.client.transactions
        members = []
        for mid in chosen:
            rec = Member.from_json(live[mid].value)
            role = rec.meta.get("role", "worker") if isinstance(rec.meta, dict) else "worker"
            members.append(WorldMember(rec.id, rec.address, rec.store, role))
        world = World(keys.job, gen + 1, tuple(members), time.time())
        cmp = [tx.value(keys.leader) == self.rdzv.id.encode()]
        cmp.append(
            tx.version(keys.gen) == 0 if gen == 0 else tx.value(keys.gen) == str(gen).encode()
        )
        ok, _ = retry_call(
            lambda: self.client.transaction(
                compare=cmp,
                success=[
                    tx.put(keys.gen, str(gen + 1)),
                    tx.put(keys.world, world.to_json()),
                    tx.put(keys.round, str(gen + 1)),
                ],
                failure=[],
            ),
            what=f"forming generation {gen + 1}",
            timeout=self.cfg.op_timeout,
        )
        if ok:
            self.worlds_formed += 1
            log.info("formed generation %d of job %s: %s", gen + 1, keys.job, list(world.ids))
        return None
