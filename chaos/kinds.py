"""The fault kinds, one class each (see :class:`chaos.spec.FaultKind`).

A kind validates its spec, describes it, fires it against the running job and
says what it expects of the run afterwards; a kind that acts inside the
workload names the signal it sends and what the workload does on it
(``in_worker``).  Registering the class is all it takes to use the kind in a
scenario, in the soak and in the workload.

Worker kinds find their victim by *rank in the current World*; the runner maps
rank to member id (``generation`` events) and member id to pid (``spawn``
events) at the moment the fault fires.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from chaos import procs
from chaos.invariants import Check
from chaos.spec import KINDS, FaultKind, FaultSpec, RunView, Target
from elastic.base import procutil
from elastic.base.errors import CollectiveTimeoutError
from elastic.base.events import Event
from elastic.base.exitcodes import EXIT_LEFT, EXIT_STOPPED


def _after(run: RunView, name: str, t: float) -> list[dict[str, Any]]:
    return [e for e in run.events(name) if e.get("t", 0.0) >= t]


def _exits(run: RunView, member: str) -> list[int | None]:
    return [e.get("rc") for e in run.events(Event.EXIT) if e.get("member") == member]


def _worlds_without(
    run: RunView, members: set[str], since: float, until: float | None = None
) -> list[dict[str, Any]]:
    """Worlds formed from ``since`` (until ``until``) that hold none of ``members``."""
    return [
        e
        for e in _after(run, Event.GENERATION, since)
        if (until is None or e["t"] <= until) and not members & set(e["world"])
    ]


def _back(run: RunView, launcher: int, since: float) -> list[dict[str, Any]]:
    """Worlds formed from ``since`` that hold a worker the launcher ``launcher`` started."""
    source = f"launcher-{launcher}"
    ours = {e["member"] for e in run.events(Event.SPAWN) if e.get("source") == source}
    return [e for e in _after(run, Event.GENERATION, since) if ours & set(e["world"])]


def _stop_host(
    target: Target, member: str, pid: int, record: dict[str, Any], alone: str
) -> tuple[int, set[int]] | None:
    """SIGSTOP the launcher of the worker ``pid`` and list the workers it started:
    (launcher, worker pids).  Stopped first, so that it starts nobody meanwhile and
    its workers are not reparented yet (they would be once it died).  None, with the
    reason in ``record``, when it is not running or is the only launcher (``alone``
    says what acting on it would do)."""
    launcher = procutil.parent(pid)
    running = target.launchers_running()
    if launcher is None or launcher not in running:
        record["detail"] = f"the launcher of {member} (pid {launcher}) is not running"
        return None
    if len(running) < 2:
        record["detail"] = f"only one launcher runs: {alone}"
        return None
    procutil.send_signal(launcher, signal.SIGSTOP)
    workers = procs.children_with_token(launcher, target.token)
    workers |= {p for _, p in target.spawned_by(launcher) if procs.belongs(p, target.token)}
    return launcher, workers


# -- faults aimed at one worker --------------------------------------------------------


class WorkerFault(FaultKind):
    """Finds the worker at ``spec.rank`` and acts on its pid."""

    needs_rank = True

    def fire(self, spec: FaultSpec, target: Target, record: dict[str, Any]) -> bool:
        assert spec.rank is not None
        found = target.worker(spec.rank)
        if found is None:
            record["detail"] = f"no running worker at rank {spec.rank}"
            return False
        member, pid = found
        record.update(member=member, pid=pid, rank=spec.rank)
        fired = self.act(spec, target, member, pid, record)
        if not fired:
            record.setdefault("detail", f"pid {pid} was already gone")
        return fired

    def act(
        self, spec: FaultSpec, target: Target, member: str, pid: int, record: dict[str, Any]
    ) -> bool:
        assert self.signal is not None
        return procutil.send_signal(pid, self.signal)


@KINDS.register
class KillWorker(WorkerFault):
    name = "kill-worker"
    summary = "SIGKILL one worker"
    expects = "its launcher saw it die of SIGKILL"
    signal = signal.SIGKILL

    def expect(self, spec: FaultSpec, record: dict[str, Any], run: RunView) -> list[Check]:
        rcs = _exits(run, record["member"])
        return [
            Check(
                self.name,
                -signal.SIGKILL in rcs,
                f"{record['member']}: its launcher saw exit code(s) {rcs}",
            )
        ]


@KINDS.register
class PauseWorker(WorkerFault):
    """SIGSTOP past the lease TTL, SIGCONT once a World without it formed (a zombie).

    No expectation of its own: a frozen *joiner* (``zombie-joiner``) is not in any
    World, so no World "without it" needs to form while it is stopped.
    """

    name = "pause-worker"
    needs_peer = True
    summary = "SIGSTOP one worker past its lease TTL, SIGCONT once evicted"

    def act(
        self, spec: FaultSpec, target: Target, member: str, pid: int, record: dict[str, Any]
    ) -> bool:
        stopped = time.monotonic()
        fired = procutil.send_signal(pid, signal.SIGSTOP)
        try:
            evicted = fired and target.wait_evicted(member, spec.duration_s)
        finally:
            procutil.send_signal(pid, signal.SIGCONT)
        record.update(evicted=evicted, stopped_s=round(time.monotonic() - stopped, 3))
        return fired


@KINDS.register
class FreezeWorker(PauseWorker):
    """A frozen peer under a collective timeout far above the lease TTL: the survivors
    must abandon the collective when its lease goes, not when the timeout ends."""

    name = "freeze-worker"
    summary = "SIGSTOP one worker until a World without it formed, with a long collective timeout"
    expects = "a World without it formed, no collective time-out while it was frozen"

    duration_means = "the longest it stays frozen"

    def expect(self, spec: FaultSpec, record: dict[str, Any], run: RunView) -> list[Check]:
        until = record["t"] + record.get("stopped_s", 0.0)
        timed_out = [
            e
            for e in _after(run, Event.FAILURE, record["t"])
            if e["t"] <= until and e.get("error_type") == CollectiveTimeoutError.__name__
        ]
        return [
            Check(
                self.name,
                bool(record.get("evicted")) and not timed_out,
                f"{record['member']} frozen {record.get('stopped_s')}s, a World without "
                f"it formed: {bool(record.get('evicted'))}; collective time-outs "
                f"meanwhile: {len(timed_out)}",
            )
        ]


@KINDS.register
class StepException(WorkerFault):
    name = "step-exception"
    summary = "the workload raises inside its next training step"
    expects = "a failed collective is recorded after it"
    signal = signal.SIGUSR1

    def in_worker(self, worker: Any) -> None:
        worker.raise_next.set()

    def expect(self, spec: FaultSpec, record: dict[str, Any], run: RunView) -> list[Check]:
        failures = _after(run, Event.FAILURE, record["t"])
        return [
            Check(
                self.name, bool(failures), f"{len(failures)} failed collective(s) recorded after it"
            )
        ]


@KINDS.register
class SlowRank(WorkerFault):
    """The workload's next ``slow_steps`` steps take ``slow_step_s`` longer (both from
    the schedule, handed to the workers at launch)."""

    name = "slow-rank"
    summary = "one worker's next steps run slower"
    signal = signal.SIGUSR2

    def in_worker(self, worker: Any) -> None:
        worker.slow_left = worker.faults.slow_steps


@KINDS.register
class HangWorker(WorkerFault):
    """The workload's main thread blocks forever in the signal handler while its
    other threads (the lease keepalive) go on: only progress detection finds it."""

    name = "hang-worker"
    summary = "one worker's training thread hangs while its lease stays alive"
    expects = "an evict event naming it (from a peer) and evicted (its launcher killed it)"
    needs_peer = True
    signal = signal.SIGPWR  # SIGUSR1/SIGUSR2 are taken by step-exception and slow-rank

    def in_worker(self, worker: Any) -> None:
        threading.Event().wait()  # no timeout: the hang under test; its launcher kills it

    def expect(self, spec: FaultSpec, record: dict[str, Any], run: RunView) -> list[Check]:
        member = record["member"]
        by_peer = [e for e in run.events(Event.EVICT) if member in e.get("members", ())]
        killed = [e for e in run.events(Event.EVICTED) if e.get("member") == member]
        return [
            Check(
                self.name,
                bool(by_peer) and bool(killed),
                f"{member}: evicted by a peer {len(by_peer)}x, killed by its "
                f"launcher {len(killed)}x",
            )
        ]


@KINDS.register
class Leave(WorkerFault):
    """SIGTERM to one worker: it leaves at the next step boundary and is not replaced."""

    name = "leave"
    summary = "SIGTERM one worker: a graceful leave at the next step boundary"
    expects = "its leave event and a clean exit (code 0 or 3)"
    signal = signal.SIGTERM

    def expect(self, spec: FaultSpec, record: dict[str, Any], run: RunView) -> list[Check]:
        member = record["member"]
        left = [e for e in run.events(Event.LEAVE) if e.get("source") == member]
        rcs = _exits(run, member)
        clean = bool(rcs) and all(rc in (EXIT_LEFT, EXIT_STOPPED) for rc in rcs)
        return [
            Check(
                self.name,
                bool(left) and clean,
                f"{member}: 'leave' events {len(left)}, exit code(s) {rcs}",
            )
        ]


@KINDS.register
class KillHost(WorkerFault):
    """SIGKILL the launcher of the worker at ``rank`` and every worker it started (a
    host gone), in a job with two or more launchers; nothing replaces them."""

    name = "kill-host"
    summary = "SIGKILL one launcher and all of its workers"
    expects = "a World without any of its workers formed"

    def act(
        self, spec: FaultSpec, target: Target, member: str, pid: int, record: dict[str, Any]
    ) -> bool:
        host = _stop_host(target, member, pid, record, alone="killing it would end the job")
        if host is None:
            return False
        launcher, workers = host
        # Workers first, while their launcher is stopped: none of them is reparented
        # or replaced before its kill is sent.
        for p in workers:
            procutil.send_signal(p, signal.SIGCONT)  # a stopped process must see the kill
            procutil.send_signal(p, signal.SIGKILL)
        procutil.send_signal(launcher, signal.SIGKILL)
        record.update(
            workers_killed=sorted(workers),
            launchers_killed=[launcher],
            members=[m for m, p in target.spawned_by(launcher) if p in workers],
        )
        return True

    def detail(self, spec: FaultSpec) -> str:
        return " (its launcher and all of its workers)"

    def expect(self, spec: FaultSpec, record: dict[str, Any], run: RunView) -> list[Check]:
        gone = set(record.get("members", ()))
        after = _worlds_without(run, gone, record["t"])
        return [
            Check(
                self.name,
                bool(gone) and bool(after),
                f"host of {sorted(gone)}: {len(after)} World(s) without them formed",
            )
        ]


@KINDS.register
class FreezeHost(WorkerFault):
    """SIGSTOP the launcher of the worker at ``rank`` and every worker it started (a
    VM paused, by a live migration say) for ``duration_s``, then SIGCONT them all,
    in a job with two or more launchers.  Give it a duration a few seconds above the
    lease TTL: the other hosts must form a World without the frozen workers while
    they are stopped (their leases lapse); once awake, each frozen worker must find
    itself fenced out (it registers again, or its generation fails, or it is ended)
    and come back only through a newer World.  What the old World still tries to
    write is refused by the generation fence (the fencing invariant)."""

    name = "freeze-host"
    summary = "SIGSTOP one launcher and all of its workers for duration_s, then SIGCONT"
    expects = (
        "a World without its workers formed while frozen; after waking each of them "
        "found itself out of the old World and they were back in a newer one"
    )

    duration_means = "how long the host stays frozen"

    def act(
        self, spec: FaultSpec, target: Target, member: str, pid: int, record: dict[str, Any]
    ) -> bool:
        host = _stop_host(target, member, pid, record, alone="freezing it pauses the job")
        if host is None:
            return False
        launcher, workers = host
        for p in workers:
            procutil.send_signal(p, signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            time.sleep(spec.duration_s)  # the pause itself
        finally:
            for p in workers:
                procutil.send_signal(p, signal.SIGCONT)
            procutil.send_signal(launcher, signal.SIGCONT)
        record.update(
            launcher=launcher,
            members=[m for m, p in target.spawned_by(launcher) if p in workers],
            frozen_s=round(time.monotonic() - frozen, 3),
            thaw_t=time.time(),
        )
        return True

    def detail(self, spec: FaultSpec) -> str:
        return " (its launcher and all of its workers)"

    def expect(self, spec: FaultSpec, record: dict[str, Any], run: RunView) -> list[Check]:
        frozen = set(record.get("members", ()))
        freeze_t, thaw_t = record["t"], record["thaw_t"]
        without = _worlds_without(run, frozen, freeze_t, thaw_t)
        # Out of the old World: it registers again or its generation fails (its own
        # events), or its launcher ends it (events about it).
        own = [*run.events(Event.REJOIN), *run.events(Event.FAILURE)]
        about = [*run.events(Event.EVICTED), *run.events(Event.EXIT)]
        noticed = {
            m: min(
                [e["t"] for e in own if e.get("source") == m and e["t"] >= thaw_t]
                + [e["t"] for e in about if e.get("member") == m and e["t"] >= thaw_t],
                default=None,
            )
            for m in frozen
        }
        unaware = sorted(m for m, t in noticed.items() if t is None)
        # Steps an older World completed after waking (before its members noticed):
        # wasted work whose writes the fence refuses; reported, not failed.
        newest = without[0]["gen"] if without else 0
        late = [e for e in _after(run, Event.STEP, thaw_t) if e["gen"] < newest]
        back = _back(run, record["launcher"], thaw_t)
        slowest = max((t for t in noticed.values() if t is not None), default=thaw_t)
        return [
            Check(
                self.name,
                bool(frozen) and bool(without) and not unaware and bool(back),
                f"host of {sorted(frozen)} frozen {record.get('frozen_s')}s: a World without "
                + (f"it {without[0]['t'] - freeze_t:.1f}s in" if without else "it never formed")
                + "; after waking "
                + (
                    f"{sorted(unaware)} never found themselves out"
                    if unaware
                    else f"all found themselves out within {slowest - thaw_t:.1f}s"
                )
                + f" (the old World completed {len(late)} more step(s) meanwhile), "
                f"{len(back)} World(s) with its workers after",
            )
        ]


@KINDS.register
class LinkDown(WorkerFault):
    """Take the link of the host the worker at ``rank`` runs on down (a cable pulled:
    its peers see silence), keep it down for ``duration_s`` (at least until a World
    without its workers formed), then bring it up.  Needs ``--hosts``."""

    name = "link-down"
    summary = "cut the link of one host (--hosts) for duration_s, then restore it"
    expects = "a World without its workers while it was cut, one with them after"

    duration_means = "how long the link stays down"

    def act(
        self, spec: FaultSpec, target: Target, member: str, pid: int, record: dict[str, Any]
    ) -> bool:
        host = target.host_of(pid)
        if host is None:
            record["detail"] = f"{member} runs on no host of a test bed (run with --hosts N)"
            return False
        launcher = procutil.parent(pid)
        elsewhere = [
            p
            for p in target.launchers_running()
            if p != launcher and target.host_of(p) not in (None, host)
        ]
        if not elsewhere:
            record["detail"] = f"no launcher runs on another host than {host.address}"
            return False
        members = [m for m, p in target.spawned_by(launcher) if procs.belongs(p, target.token)]
        down = time.monotonic()
        host.link_down()
        try:
            evicted = target.wait_evicted(member, spec.duration_s)
            time.sleep(max(0.0, spec.duration_s - (time.monotonic() - down)))  # the outage
        finally:
            host.link_up()
        record.update(
            host=host.index,
            address=host.address,
            launcher=launcher,
            members=members,
            evicted=evicted,
            down_s=round(time.monotonic() - down, 3),
            up_t=time.time(),
        )
        return True

    def detail(self, spec: FaultSpec) -> str:
        return " (the link of its host)"

    def expect(self, spec: FaultSpec, record: dict[str, Any], run: RunView) -> list[Check]:
        gone = set(record.get("members", ()))
        down_t, up_t = record["t"], record["up_t"]
        without = _worlds_without(run, gone, down_t, up_t)
        back = _back(run, record["launcher"], up_t)
        return [
            Check(
                self.name,
                bool(gone) and bool(without) and bool(back),
                f"host {record.get('address')} cut for {record.get('down_s')}s: "
                f"{len(without)} World(s) without {sorted(gone)} formed meanwhile, "
                f"{len(back)} with its workers after the link came back",
            )
        ]


# -- faults of the etcd server ----------------------------------------------------------


@KINDS.register
class KillEtcd(FaultKind):
    name = "kill-etcd"
    summary = "SIGKILL etcd; restart it on the same data dir and port after duration_s"

    def fire(self, spec: FaultSpec, target: Target, record: dict[str, Any]) -> bool:
        target.etcd.kill()
        if spec.duration_s:  # 0: left down until a restart-etcd
            time.sleep(spec.duration_s)  # the outage itself
            target.etcd.restart()
        return True


@KINDS.register
class KillEtcdLeader(FaultKind):
    """SIGKILL the leader of the run's etcd cluster (a scenario with ``etcd_members``
    3 or more); restart it on its data dir after ``duration_s``."""

    name = "kill-etcd-leader"
    summary = "SIGKILL the etcd cluster's leader; restart it after duration_s"
    expects = "steps completed while the leader was down, none redone after it"

    def fire(self, spec: FaultSpec, target: Target, record: dict[str, Any]) -> bool:
        if not hasattr(target.etcd, "kill_member"):
            record["detail"] = "etcd runs as one member: there is no leader to lose"
            return False
        url = target.etcd.leader()
        target.etcd.kill_member(url)
        killed = time.monotonic()
        record["leader"] = url
        if spec.duration_s:
            time.sleep(spec.duration_s)  # the member's outage
            target.etcd.restart_member(url)
        record["down_s"] = round(time.monotonic() - killed, 3)
        return True

    def expect(self, spec: FaultSpec, record: dict[str, Any], run: RunView) -> list[Check]:
        t0, t1 = record["t"], record["t"] + record.get("down_s", 0.0)
        after = _after(run, Event.STEP, t0)
        during = [e for e in after if e["t"] <= t1]
        redone = sum(1 for a, b in zip(after, after[1:], strict=False) if b["step"] <= a["step"])
        return [
            Check(
                self.name,
                bool(during) and redone == 0,
                f"leader {record.get('leader')} down {record.get('down_s')}s: "
                f"{len(during)} step(s) completed meanwhile, {redone} redone after it",
            )
        ]


@KINDS.register
class RestartEtcd(FaultKind):
    name = "restart-etcd"
    summary = "bring back an etcd killed with duration 0"

    def fire(self, spec: FaultSpec, target: Target, record: dict[str, Any]) -> bool:
        target.etcd.restart()
        return True


@KINDS.register
class PauseEtcd(FaultKind):
    name = "pause-etcd"
    summary = "SIGSTOP etcd for duration_s, then SIGCONT"

    def fire(self, spec: FaultSpec, target: Target, record: dict[str, Any]) -> bool:
        target.etcd.pause()
        try:
            time.sleep(spec.duration_s)  # the outage itself
        finally:
            target.etcd.resume()
        return True


# -- faults of the job as a whole ---------------------------------------------------------


@KINDS.register
class Join(FaultKind):
    """A second ``elastic run --job same -n count``: more workers join the running job."""

    name = "join"
    summary = "start count more workers for the job (a new launcher)"
    expects = "a worker it started is in a World"

    def detail(self, spec: FaultSpec) -> str:
        return f" ({spec.count} worker(s))"

    def fire(self, spec: FaultSpec, target: Target, record: dict[str, Any]) -> bool:
        record["detail"], record["launcher"] = target.join(spec.count)
        return True

    def expect(self, spec: FaultSpec, record: dict[str, Any], run: RunView) -> list[Check]:
        source = f"launcher-{record['launcher']}"
        joined = {e["member"] for e in run.events(Event.SPAWN) if e.get("source") == source}
        trained = [e for e in run.events(Event.GENERATION) if joined & set(e["world"])]
        return [
            Check(
                self.name,
                bool(trained),
                f"{len(joined)} joiner(s) spawned, in {len(trained)} World(s)",
            )
        ]


@KINDS.register
class KillAllResume(FaultKind):
    name = "kill-all-resume"
    summary = "SIGKILL every launcher and worker, then start the job with --resume"

    def fire(self, spec: FaultSpec, target: Target, record: dict[str, Any]) -> bool:
        record["detail"] = target.kill_all_and_resume()
        return True
