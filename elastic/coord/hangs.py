"""Hang detection by progress: evict a rank that never reaches a step's collective.

A rank whose keepalive thread lives but whose training thread is stuck (a
deadlock, an endless loop in the step, a stuck device) keeps its lease, so the
membership never notices it; its peers would wait for the collective timeout.
Instead every rank that has waited in step ``s``'s all-reduce for a while says
so in etcd (``waiting/{id}``, under its lease). Once the waiters have waited
longer than a bound derived from the observed step times, the ranks of the
World that are not waiting in step ``s`` are hung: a waiter evicts them (an
``evicted/{id}`` record their launcher acts on, and their lease revoked, which
fences them and makes the leader re-form without them).

A slow rank that still progresses arrives before the bound: its slowness is in
the step times the bound is derived from, so it is never evicted.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..base.errors import ConfigError, ElasticError
from .etcd import retry_call
from .keys import Keyspace
from .world import World

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HangConfig:
    # Never evict a rank for being later than this...
    floor_s: float = 5.0
    # ...or than this many median step times.
    factor: float = 10.0
    # Until this many steps were timed there is no basis for a bound: only the
    # collective timeout applies (first steps may compile, warm caches, ...).
    min_history: int = 5
    history: int = 50

    def __post_init__(self) -> None:
        if self.floor_s <= 0:
            raise ConfigError(f"hang floor must be > 0 seconds, got {self.floor_s}")
        if self.factor < 1:
            raise ConfigError(f"hang factor must be >= 1, got {self.factor}")
        if not 1 <= self.min_history <= self.history:
            raise ConfigError(
                f"hang min_history must be between 1 and history ({self.history}), "
                f"got {self.min_history}"
            )


class StepClock:
    """Observed step durations and the hang bound derived from them."""

    def __init__(self, config: HangConfig, fallback_s: float) -> None:
        self.config = config
        self.fallback_s = fallback_s
        self._times: deque[float] = deque(maxlen=config.history)
        self._last: float | None = None

    def mark(self, now: float | None = None) -> None:
        """A step completed (call once per step)."""
        now = time.monotonic() if now is None else now
        if self._last is not None:
            self._times.append(now - self._last)
        self._last = now

    def reset(self) -> None:
        """A new generation: the gap across a re-form is not a step time."""
        self._last = None

    def bound(self) -> float:
        if len(self._times) < self.config.min_history:
            return self.fallback_s
        return max(self.config.floor_s, self.config.factor * statistics.median(self._times))


class HangWatch:
    """The watch of one step's all-reduce (see ``WorkerGroup``'s ``watch``)."""

    # Once a waiter has waited this share of the bound it reports, leaving the
    # rest of the bound for its report to reach etcd before anyone judges.
    REPORT_SHARE = 0.25
    CHECK_EVERY_S = 0.5

    def __init__(
        self,
        *,
        client: Any,
        keys: Keyspace,
        lease_id: int,
        member_id: str,
        world: World,
        step: int,
        bound_s: float,
        broken: Callable[[], str | None],
        on_evict: Callable[[list[str], str], None],
        op_timeout: float = 2.0,
    ) -> None:
        self.client = client
        self.keys = keys
        self.lease_id = lease_id
        self.me = member_id
        self.world = world
        self.step = step
        self.bound_s = bound_s
        self.broken = broken
        self.on_evict = on_evict
        self.op_timeout = op_timeout
        self._reported = False
        self._last_check = 0.0
        self._evicted: set[str] = set()

    def __call__(self, waited: float) -> str | None:
        reason = self.broken()
        if reason is not None:
            return reason
        try:
            if not self._reported and waited >= self.REPORT_SHARE * self.bound_s:
                self._report()
            now = time.monotonic()
            if waited >= self.bound_s and now - self._last_check >= self.CHECK_EVERY_S:
                self._last_check = now
                self._judge(waited)
        except ElasticError as exc:
            # etcd trouble is not a verdict on a peer; the membership (a lost
            # session) and the collective timeout still apply.
            log.warning("hang check of step %d failed: %s", self.step, exc)
        return None

    def _report(self) -> None:
        record = json.dumps({"gen": self.world.generation, "step": self.step})
        retry_call(
            lambda: self.client.put(self.keys.waiting + self.me, record, lease=self.lease_id),
            what="reporting a wait",
            timeout=self.op_timeout,
        )
        self._reported = True

    def _waiters(self) -> set[str]:
        rows = retry_call(
            lambda: list(self.client.get_prefix(self.keys.waiting)),
            what="reading waiting ranks",
            timeout=self.op_timeout,
        )
        mine = {"gen": self.world.generation, "step": self.step}
        out = set()
        for value, meta in rows:
            try:
                if json.loads(value) == mine:
                    out.add(meta.key.decode()[len(self.keys.waiting) :])
            except (ValueError, TypeError):
                continue
        return out

    def _judge(self, waited: float) -> None:
        waiters = self._waiters()
        if self.me not in waiters:
            return  # our own report is not visible yet: no basis to judge others
        hung = [m for m in self.world.ids if m not in waiters and m not in self._evicted]
        if not hung:
            return
        # The lowest-ranked waiter acts; the others give it a check interval
        # first, so one eviction is recorded, yet a stuck judge is no obstacle.
        first = min(self.world.rank_of(m) for m in waiters)
        if self.world.rank_of(self.me) != first and waited < self.bound_s + 2 * self.CHECK_EVERY_S:
            return
        reason = (
            f"did not reach step {self.step}'s all-reduce of generation "
            f"{self.world.generation} within {self.bound_s:.1f}s of its peers"
        )
        for m in hung:
            evict(self.client, self.keys, m, reason, by=self.me, timeout=self.op_timeout)
            self._evicted.add(m)
        self.on_evict(hung, reason)


def evict(
    client: Any, keys: Keyspace, member_id: str, reason: str, *, by: str, timeout: float
) -> None:
    """Record why ``member_id`` is evicted, then revoke its lease (fencing it)."""
    record = json.dumps({"reason": reason, "by": by, "at": time.time()})
    retry_call(
        lambda: client.put(keys.evicted + member_id, record),
        what=f"recording the eviction of {member_id}",
        timeout=timeout,
    )
    raw = retry_call(
        lambda: client.get(keys.lease_of(member_id))[0],
        what=f"reading the lease of {member_id}",
        timeout=timeout,
    )
    if raw is None:
        return  # gone already
    try:
        client.revoke_lease(int(raw))
    except Exception as exc:  # expired meanwhile: the same outcome
        log.debug("revoking the lease of %s: %r", member_id, exc)
