"""``elastic chaos``: run fault scenarios as real processes, check invariants, report.

For every (scenario, seed) the runner starts its own embedded etcd (so it can
kill, pause and restart it), launches ``elastic run`` on the chaos workload
with a ledger, an event log and a checkpoint location of its own, follows the
event log (bounded polling) to fire each fault of the schedule at its step or
event, waits for the run to end within its bound, stops everything it started
(also on Ctrl-C and on errors), and checks the invariants.  A failure-free
reference run per training configuration comes first.

Exit code of ``elastic chaos run``: 0 when every invariant and expectation of
every run held, 1 otherwise, 2 for bad arguments, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chaos import invariants as inv
from chaos import scenarios as sc
from chaos.faults import (
    BREAKS,
    JOINER,
    ON_CHECKPOINT,
    ON_FAILURE,
    ON_FULL_WORLD,
    ON_JOINER_READY,
    ON_RENDEZVOUS,
    ON_STEP,
    FaultSpec,
    WorkerFaults,
    inject,
    read_storage_records,
    send_signal,
)
from elastic.events import LogFollower

EXIT_OK, EXIT_VIOLATION, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_STOPPED = 3  # a worker's exit code when the job was stopped (elastic.runtime)
WORKLOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workload.py")
TOKEN_ENV = "CHAOS_RUN_TOKEN"
POLL_S = 0.05
REFERENCE_WORKERS = 3
REFERENCE_STEP_TIME = 0.02


class ChaosError(Exception):
    """A run could not be carried out (not an invariant violation)."""


# -- following a run's event log -------------------------------------------------------


class EventTail(LogFollower):
    """Incremental reader of a JSONL event log that keeps every event it read."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.events: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        new = super().poll()
        self.events.extend(new)
        return new

    def of(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]


@dataclass
class Segment:
    """One ``elastic run`` job: the first launch, or a ``--resume`` after a kill-all."""

    index: int
    job: str
    tail: EventTail
    ledger: str
    resume: bool
    started: float  # time.time()


@dataclass
class Launched:
    proc: subprocess.Popen
    segment: int
    role: str  # "main" or "join"
    log: str


@dataclass(frozen=True)
class Settings:
    """How the suite drives a job; a user points these at their own setup."""

    lease_ttl: float = 2.0
    collective_timeout: float = 4.0
    max_restarts: int = 10
    timeout_scale: float = 1.0
    checkpoint_base: str | None = None  # fsspec URL prefix; default: file:// in the run dir
    etcd_binary: str | None = None
    tolerance: float = inv.DEFAULT_TOLERANCE
    python: str = sys.executable
    workload: str = WORKLOAD


@dataclass
class Reference:
    config: sc.TrainConfig
    params: dict[str, Any]
    losses: dict[int, float]
    result: RunResult


@dataclass
class RunResult:
    name: str  # scenario name, or "reference"
    seed: int | None
    breaks: tuple[str, ...]
    schedule: list[str]
    schedule_json: dict[str, Any]
    faults: list[dict[str, Any]]
    checks: list[inv.Check]
    expectations: list[inv.Check]
    recovery_s: list[float]
    steps_redone: int
    wall_s: float
    bound_s: float
    exit_codes: list[int | None]
    run_dir: str
    timeline: dict[str, Any]
    config_key: str
    error: str | None = None
    warnings: list[str] = field(default_factory=list)  # anomalies that break no invariant

    @property
    def invariants_held(self) -> bool:
        return self.error is None and all(c.held for c in self.checks)

    @property
    def passed(self) -> bool:
        return self.invariants_held and all(c.held for c in self.expectations)

    def check(self, name: str) -> inv.Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.name, "seed": self.seed, "breaks": list(self.breaks),
            "passed": self.passed, "invariants_held": self.invariants_held,
            "schedule": self.schedule, "schedule_spec": self.schedule_json,
            "faults": self.faults, "invariants": [c.to_json() for c in self.checks],
            "expectations": [c.to_json() for c in self.expectations],
            "recovery_s": self.recovery_s, "steps_redone": self.steps_redone,
            "wall_s": round(self.wall_s, 2), "bound_s": self.bound_s,
            "launcher_exit_codes": self.exit_codes, "run_dir": self.run_dir,
            "config": self.config_key, "error": self.error, "warnings": self.warnings,
            "timeline": self.timeline,
        }


# -- processes ----------------------------------------------------------------------------


def _environ_has(pid: int, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in f.read().split(b"\0")
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] != b"Z"


def processes_with_token(token: str) -> set[int]:
    """Live processes started for one run: they carry its token in their environment."""
    needle = f"{TOKEN_ENV}={token}".encode()
    me = os.getpid()
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me and _environ_has(int(name), needle):
            if _alive(int(name)):
                found.add(int(name))
    return found


# The child sets PR_SET_PDEATHSIG itself and then execs the launcher: a launcher
# must not outlive a killed runner, and a preexec_fn would make subprocess fork
# this process, whose gRPC threads (the runner talks to etcd) can abort a
# forked child before it execs (seen in the launcher: SIGABRT right after fork).
_EXEC_DYING_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(70)  # the runner is already gone\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _dying_with_us(cmd: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-c", _EXEC_DYING_WITH_PARENT, str(os.getpid()), *cmd]


def _embedded_etcd(data_dir: str, binary: str | None) -> Any:
    from elastic.etcd import EmbeddedEtcd

    try:
        return EmbeddedEtcd(data_dir=data_dir, binary=binary, die_with_parent=True)
    except TypeError:  # a runtime without die_with_parent
        return EmbeddedEtcd(data_dir=data_dir, binary=binary)


# -- one run ----------------------------------------------------------------------------------


@dataclass
class RunPlan:
    name: str
    seed: int | None
    scenario: sc.Scenario
    schedule: sc.Schedule
    breaks: tuple[str, ...] = ()
    bound_s: float | None = None  # default: the scenario's, times the timeout scale
    step_time: float | None = None
    workers: int | None = None


class Run:
    """One job under a fault schedule: processes, fault firing, artifacts. Implements
    :class:`chaos.faults.Target`."""

    def __init__(self, plan: RunPlan, settings: Settings, run_dir: str) -> None:
        self.plan = plan
        self.settings = settings
        self.scenario = plan.scenario
        self.workers = plan.workers or self.scenario.workers
        self.run_dir = run_dir
        self.token = uuid.uuid4().hex
        self.segments: list[Segment] = []
        self.launched: list[Launched] = []
        self.records: list[dict[str, Any]] = []
        self.snapshots: list[inv.StoreState] = []
        self.resume_recoveries: list[tuple[float, int]] = []  # (kill time, segment)
        self.etcd: Any = None
        self._etcd_dir: str | None = None
        self._client: Any = None
        self.out_dir = os.path.join(run_dir, "out")
        self.faults_dir = os.path.join(run_dir, "faults")
        base = settings.checkpoint_base
        self.checkpoint = (f"{base.rstrip('/')}/{os.path.basename(run_dir)}-{self.token[:8]}"
                           if base else "file://" + os.path.join(run_dir, "ckpt"))
        self.bound_s = (plan.bound_s if plan.bound_s is not None
                        else self.scenario.bound_s * settings.timeout_scale)
        self.commits: list[inv.CommitRecord] | None = None
        self.ended = False
        self.wall_s = 0.0

    # -- Target ------------------------------------------------------------------------

    @property
    def segment(self) -> Segment:
        return self.segments[-1]

    def poll(self) -> None:
        for seg in self.segments:
            seg.tail.poll()

    def world(self) -> list[str]:
        gens = self.segment.tail.of("generation")
        return list(gens[-1]["world"]) if gens else []

    def pid_of(self, member: str) -> int | None:
        for seg in self.segments:
            for e in seg.tail.of("spawn"):
                if e.get("member") == member:
                    return int(e["pid"])
        return None

    def worker(self, rank: int) -> tuple[str, int] | None:
        self.poll()
        world = self.world()
        if rank == JOINER:
            outside = [e["member"] for seg in self.segments for e in seg.tail.of("spawn")
                       if e["member"] not in world]
            if not outside:
                return None
            member = outside[-1]
        elif not world:
            return None
        else:
            member = world[rank % len(world)]
        pid = self.pid_of(member)
        if pid is None or not _environ_has(pid, f"{TOKEN_ENV}={self.token}".encode()):
            return None  # gone (its pid may already belong to someone else)
        return member, pid

    def wait_evicted(self, member: str, longest_s: float) -> bool:
        since = len(self.segment.tail.events)
        earliest = time.monotonic() + self.settings.lease_ttl + 0.5
        deadline = time.monotonic() + max(longest_s, self.settings.lease_ttl + 0.5)
        evicted = False
        while time.monotonic() < deadline:
            self.poll()
            if not evicted:
                evicted = any(e.get("event") == "generation" and member not in e["world"]
                              for e in self.segment.tail.events[since:])
            if evicted and time.monotonic() >= earliest:
                return True
            time.sleep(POLL_S)
        return evicted

    def join(self, count: int) -> str:
        launched = self._launch(self.segment, count, role="join")
        return f"launcher pid {launched.proc.pid} with {count} worker(s)"

    def kill_all_and_resume(self) -> str:
        killed_at = time.time()
        victims = self._stop_processes()
        self.poll()
        self.snapshots.append(inv.inspect_store(self.checkpoint))
        seg = self._new_segment(resume=True)
        self.resume_recoveries.append((killed_at, seg.index))
        newest = max(self.snapshots[-1].committed, default=None)
        return (f"killed {victims} process(es); resuming as job {seg.job} "
                f"(newest committed step {newest})")

    # -- lifecycle ------------------------------------------------------------------------

    def _new_segment(self, resume: bool) -> Segment:
        index = len(self.segments)
        job = f"chaos-{self.token[:8]}-{index}"
        seg = Segment(index, job, EventTail(os.path.join(self.run_dir, f"events-{index}.jsonl")),
                      os.path.join(self.run_dir, "ledger", f"seg{index}"), resume, time.time())
        self.segments.append(seg)
        self._launch(seg, self.workers, role="main")
        return seg

    def _launch(self, seg: Segment, nproc: int, role: str) -> Launched:
        s, plan = self.settings, self.plan
        cmd = [s.python, "-m", "elastic.cli", "run", "--etcd", self.etcd.url, "--job", seg.job,
               "-n", str(nproc), "--event-log", seg.tail.path, "--ledger-dir", seg.ledger,
               "--checkpoint", self.checkpoint,
               "--checkpoint-every", str(self.scenario.checkpoint_every),
               "--lease-ttl", str(s.lease_ttl), "--collective-timeout", str(s.collective_timeout),
               "--settle", str(self.scenario.settle_s), "--max-restarts", str(s.max_restarts),
               "--min-workers", str(self.scenario.min_workers),
               "--join-timeout", str(max(30.0, self.bound_s))]
        if seg.resume and role == "main":
            cmd.append("--resume")
        step_time = plan.step_time if plan.step_time is not None else self.scenario.step_time
        cmd += [s.workload, "--out-dir", self.out_dir, "--step-time", str(step_time),
                *self.scenario.train.args()]
        for b in plan.breaks:
            cmd += ["--break", b]
        sched = plan.schedule
        env = dict(os.environ)
        env.update(WorkerFaults(storage=sched.storage, seed=plan.seed or 0,
                                slow_step_s=sched.slow_step_s, slow_steps=sched.slow_steps,
                                record_dir=self.faults_dir).to_env())
        env[TOKEN_ENV] = self.token
        env["PYTHONUNBUFFERED"] = "1"
        log = os.path.join(self.run_dir, "logs", f"launcher-{len(self.launched)}-{role}.log")
        with open(log, "wb") as out:
            proc = subprocess.Popen(_dying_with_us(cmd), env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        launched = Launched(proc, seg.index, role, log)
        self.launched.append(launched)
        return launched

    def _stop_processes(self) -> int:
        """SIGKILL every launcher and worker of this run; returns how many were running."""
        victims = {lp.proc.pid for lp in self.launched if lp.proc.poll() is None}
        victims |= processes_with_token(self.token)
        running = len(victims)
        deadline = time.monotonic() + 15.0
        while True:
            for pid in victims:
                send_signal(pid, signal.SIGCONT)  # a stopped process must see the kill
                send_signal(pid, signal.SIGKILL)
            for lp in self.launched:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    lp.proc.wait(timeout=0.2)
            left = {p for p in victims | processes_with_token(self.token) if _alive(p)}
            if not left or time.monotonic() > deadline:
                break
            victims = left
            time.sleep(POLL_S)
        return running

    def _launchers_running(self) -> bool:
        return any(lp.proc.poll() is None for lp in self.launched
                   if lp.segment == self.segment.index)

    def _etcd_client(self) -> Any:
        if self._client is None:
            from elastic.etcd import EtcdConfig, connect

            self._client = connect(EtcdConfig.from_url(self.etcd.url, rpc_timeout=2.0,
                                                       connect_timeout=10.0))
        return self._client

    def _rendezvous_state(self) -> tuple[int, int, set[str], set[str], set[str]] | None:
        """(generation, round, World ids, live ids, ready ids) from etcd; None if down."""
        from elastic.etcd import TRANSIENT_ERRORS
        from elastic.keys import Keyspace

        keys = Keyspace(self.segment.job)
        try:
            client = self._etcd_client()
            ctl = {m.key.decode(): v for v, m in client.get_prefix(keys.ctl)}
            live = {m.key.decode()[len(keys.members):]
                    for _, m in client.get_prefix(keys.members)}
            ready = {m.key.decode()[len(keys.ready):] for _, m in client.get_prefix(keys.ready)}
        except TRANSIENT_ERRORS:
            return None
        world = json.loads(ctl[keys.world])["members"] if keys.world in ctl else []
        return (int(ctl.get(keys.gen, b"0")), int(ctl.get(keys.round, b"0")),
                {m["id"] for m in world}, live, ready)

    def _rendezvous_in_progress(self) -> bool:
        state = self._rendezvous_state()
        if state is None:
            return False
        gen, rnd, world, live, _ = state
        return rnd > gen or bool(live - world)

    def _joiner_ready(self) -> bool:
        state = self._rendezvous_state()
        return state is not None and bool((state[3] & state[4]) - state[2])

    def _await(self, spec: FaultSpec, since: int, deadline: float) -> bool:
        """Wait (bounded) for the trigger of ``spec``; False if the run ended first."""
        seg_index = self.segment.index

        def hit() -> bool:
            events = self.segment.tail.events
            if spec.on == ON_STEP:
                return any(e["event"] == "step" and e["step"] >= spec.at_step for e in events)
            if spec.on == ON_CHECKPOINT:
                return any(e["event"] == "checkpoint" and e["step"] >= spec.at_step
                           for e in events)
            if spec.on == ON_FAILURE:
                return any(e["event"] == "failure" for e in events[since:])
            if spec.on == ON_FULL_WORLD:
                return any(e["event"] == "generation" and len(e["world"]) >= self.workers
                           for e in events[since:])
            if spec.on == ON_RENDEZVOUS:
                return self._rendezvous_in_progress()
            if spec.on == ON_JOINER_READY:
                return self._joiner_ready()
            raise ChaosError(f"unknown trigger {spec.on!r}")

        while time.monotonic() < deadline:
            self.poll()
            if self.segment.index != seg_index:
                return False
            if hit():
                return True
            if not self._launchers_running():
                return False
            time.sleep(POLL_S)
        return False

    def execute(self) -> None:
        os.makedirs(os.path.join(self.run_dir, "logs"), exist_ok=True)
        self._etcd_dir = tempfile.mkdtemp(prefix="chaos-etcd-")
        started = time.monotonic()
        deadline = started + self.bound_s
        try:
            self.etcd = _embedded_etcd(self._etcd_dir, self.settings.etcd_binary).start()
            self._new_segment(resume=False)
            for spec in self.plan.schedule.faults:
                since = len(self.segment.tail.events)
                if self.records and self.records[-1].get("segment") == self.segment.index:
                    since = self.records[-1].get("event_index", since)
                if not self._await(spec, since, deadline):
                    self.records.append({"kind": spec.kind, "fault": spec.describe(),
                                         "fired": False, "t": time.time(),
                                         "detail": "trigger not reached before the run ended"})
                    continue
                if spec.delay_s:
                    time.sleep(min(spec.delay_s, max(0.0, deadline - time.monotonic())))
                step, seg = self._last_step(), self.segment.index
                before = len(self.segment.tail.events)  # later triggers look after this
                record = inject(spec, self)
                if self.segment.index != seg:  # a resume started a new event log
                    before = 0
                record.update(step=step, segment=self.segment.index, event_index=before)
                self.records.append(record)
            while time.monotonic() < deadline and self._launchers_running():
                time.sleep(POLL_S)
            self.ended = not self._launchers_running()
            self.wall_s = time.monotonic() - started
        finally:
            self.wall_s = self.wall_s or time.monotonic() - started
            self._finish()

    def _last_step(self) -> int | None:
        steps = self.segment.tail.of("step")
        return steps[-1]["step"] if steps else None

    def _finish(self) -> None:
        try:
            self._stop_processes()
        finally:
            try:
                self.poll()
                if self.etcd is not None:
                    if self.etcd.process is None:  # left down by a fault
                        self.etcd.start()
                    self.etcd.resume()
                    self.commits = inv.read_commits(self._etcd_client())
            except Exception as exc:  # reported as an unchecked invariant
                self.commits = None
                self.commit_error = repr(exc)
            finally:
                if self._client is not None:
                    with contextlib.suppress(Exception):
                        self._client.close()
                if self.etcd is not None:
                    self.etcd.stop()
                if self._etcd_dir:
                    shutil.rmtree(self._etcd_dir, ignore_errors=True)

    # -- verdict ------------------------------------------------------------------------------

    def evaluate(self, reference: Reference | None) -> RunResult:
        plan, sched, train = self.plan, self.plan.schedule, self.scenario.train
        total = train.total_steps
        finals = inv.load_params(self.out_dir)
        records = inv.read_ledgers([seg.ledger for seg in self.segments])
        expected = inv.expected_epochs(train.dataset_size, train.batch_size, train.seed, total)
        final_store = inv.inspect_store(self.checkpoint)
        restores = [inv.Restore(e["t"], e["step"], seg.index)
                    for seg in self.segments for e in seg.tail.of("restore")]
        resumed = [seg.index for seg in self.segments if seg.resume]
        unfinished = self._unfinished()
        if reference is not None:
            params = inv.check_params(finals, reference.params, self.settings.tolerance,
                                      unfinished)
        else:
            params = _self_consistent(finals, self.settings.tolerance, unfinished)
        checks = [
            params,
            inv.check_exactly_once(records, expected, total),
            inv.check_checkpoints(final_store, self.snapshots, restores, resumed, total,
                                  sched.corrupted_on_purpose),
            inv.check_fencing(self.commits, final_store),
            inv.check_no_hang(self.ended, self.wall_s, self.bound_s,
                              [lp.proc.returncode for lp in self.launched]),
        ]
        if self.commits is None:
            checks[3] = inv.Check(inv.FENCING, False, "etcd history unavailable: "
                                  + getattr(self, "commit_error", "unknown error"))
        expectations = self._expectations(final_store)
        recovery = [float(e["seconds"]) for seg in self.segments
                    for e in seg.tail.of("recovered")]
        for killed_at, index in self.resume_recoveries:
            steps = self.segments[index].tail.of("step")
            if steps:
                recovery.append(round(steps[0]["t"] - killed_at, 3))
        return RunResult(
            name=plan.name, seed=plan.seed, breaks=plan.breaks, schedule=sched.describe(),
            schedule_json=sched.to_json(), faults=self.records, checks=checks,
            expectations=expectations, recovery_s=recovery,
            steps_redone=inv.steps_redone(records), wall_s=self.wall_s, bound_s=self.bound_s,
            exit_codes=[lp.proc.returncode for lp in self.launched], run_dir=self.run_dir,
            timeline=self._timeline(), config_key=train.key, warnings=self._warnings(),
        )

    def _warnings(self) -> list[str]:
        """Workers that died although no fault was aimed at them (crashes of the runtime)."""
        targets = {r.get("member") for r in self.records}
        out = []
        for seg in self.segments:
            for e in seg.tail.of("exit"):
                if e.get("rc") not in (0, EXIT_STOPPED) and e["member"] not in targets:
                    out.append(f"worker {e['member']} exited with {e['rc']} without being "
                               f"targeted (segment {seg.index}; see its launcher log)")
        return out

    def _unfinished(self) -> str | None:
        """Why the job did not finish, or None: rank 0 of its last launch reported
        ``finished`` and every launcher of that launch ended without an error (exit 0,
        or 3: its workers left while the job went on elsewhere)."""
        last = [lp for lp in self.launched if lp.segment == self.segment.index]
        codes = [lp.proc.returncode for lp in last]
        problems = []
        if not self.segment.tail.of("finished"):
            problems.append("rank 0 never reported 'finished'")
        # Launchers the runner stopped at the bound are the no-hang invariant's finding.
        if self.ended and any(c not in (0, EXIT_STOPPED) for c in codes):
            shown = ", ".join("killed" if c is None else str(c) for c in codes)
            problems.append(f"launcher exit code(s) {shown}")
        gave_up = self.segment.tail.of("give_up")
        if gave_up:
            problems.append(f"the launcher gave up on {gave_up[0].get('member')} "
                            "(no restarts left)")
        return "; ".join(problems) or None

    def _events(self, name: str) -> list[dict[str, Any]]:
        return [e for seg in self.segments for e in seg.tail.of(name)]

    def _expectations(self, store: inv.StoreState) -> list[inv.Check]:
        sched = self.plan.schedule
        out = inv.Expectations()
        not_fired = [r["fault"] for r in self.records if not r.get("fired")]
        if self.records:
            out.add(sc.EXPECT_FAULTS_FIRED, not not_fired,
                    f"not fired: {not_fired}" if not_fired
                    else f"{len(self.records)} scheduled fault(s) fired")
        recorded = read_storage_records(self.faults_dir)
        for f in sched.storage:
            if f.action == "fail":
                hits = sum(1 for r in recorded if r["fault"] == f.to_json())
                out.add(sc.EXPECT_FAULTS_FIRED, hits > 0,
                        f"{f.describe()}: injected {hits} time(s)")
        failed = self._events("checkpoint_failed")
        ckpts = [s for s in range(self.scenario.checkpoint_every,
                                  self.scenario.train.total_steps + 1,
                                  self.scenario.checkpoint_every)]
        ckpts.append(self.scenario.train.total_steps)
        for name in self.scenario.expect:
            if name == sc.EXPECT_NO_EVICTION:
                gens = self._events("generation")
                fails = self._events("failure")
                out.add(name, len(gens) == 1 and not fails,
                        f"{len(gens)} generation(s), {len(fails)} failed collective(s)")
            elif name == sc.EXPECT_CHECKPOINT_FAILED:
                steps = {f.step for f in sched.storage}
                leaked = sorted(steps & set(store.committed))
                out.add(name, bool(failed) and not leaked,
                        f"{len(failed)} checkpoint failure(s) reported"
                        + (f"; faulted step(s) {leaked} committed anyway" if leaked else ""))
            elif name == sc.EXPECT_ALL_COMMITTED:
                missing = sorted(set(ckpts) - set(store.committed))
                out.add(name, not missing and not failed,
                        f"missing steps {missing}, {len(failed)} checkpoint failure(s)"
                        if missing or failed else f"all {len(set(ckpts))} checkpoints committed")
            elif name == sc.EXPECT_STALE_REFUSED:
                stale = [e for e in failed if "no longer current" in e.get("error", "")]
                out.add(name, bool(stale), f"{len(stale)} stale commit(s) refused")
            elif name == sc.EXPECT_DAMAGE_DETECTED:
                damaged = sched.corrupted_on_purpose
                undetected = sorted(s for s in damaged if s in store.committed
                                    and s not in store.bad)
                uncommitted = sorted(damaged - set(store.committed))
                out.add(name, not undetected and not uncommitted,
                        f"damaged step(s) {sorted(damaged)}: flagged by verify "
                        f"{sorted(damaged & set(store.bad))}, not flagged {undetected}, "
                        f"never committed {uncommitted}")
            elif name == sc.EXPECT_JOINED:
                sizes = [len(e["world"]) for e in self._events("generation")]
                out.add(name, max(sizes, default=0) > self.workers,
                        f"World sizes {sizes}")
        return out.checks

    def _timeline(self) -> dict[str, Any]:
        steps = [{"seg": seg.index, "t": e["t"], "step": e["step"], "loss": e["loss"],
                  "world": e["world"], "gen": e["gen"]}
                 for seg in self.segments for e in seg.tail.of("step")]
        faults = [{"t": r["t"], "step": r.get("step"), "seg": r.get("segment"),
                   "kind": r["kind"], "fired": r.get("fired", False)} for r in self.records]
        t0 = min((seg.started for seg in self.segments), default=0.0)
        return {"t0": t0, "steps": steps, "faults": faults}


def _self_consistent(finals: dict[str, dict[str, Any]], tolerance: float,
                     unfinished: str | None) -> inv.Check:
    """For the reference itself: every finisher holds the same parameters."""
    if unfinished:
        return inv.Check(inv.PARAMS, False, f"the job did not finish: {unfinished}")
    if not finals:
        return inv.Check(inv.PARAMS, False, "no worker finished training")
    first = next(iter(finals.values()))
    worst = max(inv.max_param_diff(p, first) for p in finals.values())
    return inv.Check(inv.PARAMS, worst <= tolerance,
                     f"reference: {len(finals)} finisher(s) agree within {worst:.2e}")


def run_one(plan: RunPlan, settings: Settings, run_dir: str,
            reference: Reference | None) -> RunResult:
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    run = Run(plan, settings, run_dir)
    error = None
    try:
        run.execute()
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # the run could not be carried out: reported, not raised
        error = f"{type(exc).__name__}: {exc}"
    try:
        result = run.evaluate(reference)
    except Exception as exc:
        if error is None:
            raise
        result = _unevaluated(plan, run, error + f" (then evaluating: {exc!r})")
    result.error = error
    return result


def _unevaluated(plan: RunPlan, run: Run, error: str) -> RunResult:
    checks = [inv.Check(name, False, "not evaluated: the run failed") for name in inv.INVARIANTS]
    return RunResult(
        name=plan.name, seed=plan.seed, breaks=plan.breaks, schedule=plan.schedule.describe(),
        schedule_json=plan.schedule.to_json(), faults=run.records, checks=checks,
        expectations=[], recovery_s=[], steps_redone=0, wall_s=run.wall_s, bound_s=run.bound_s,
        exit_codes=[lp.proc.returncode for lp in run.launched], run_dir=run.run_dir,
        timeline={"t0": 0.0, "steps": [], "faults": []}, config_key=plan.scenario.train.key,
        error=error)


def run_reference(config: sc.TrainConfig, settings: Settings, work_dir: str) -> Reference:
    scenario = sc.Scenario("reference", "failure-free run", lambda rng, s: sc.Schedule(),
                           train=config, step_time=REFERENCE_STEP_TIME,
                           workers=REFERENCE_WORKERS)
    plan = RunPlan("reference", None, scenario, sc.Schedule())
    result = run_one(plan, settings, os.path.join(work_dir, "reference-" + config.key), None)
    if not result.passed:
        failed = [f"{c.name}: {c.detail}" for c in result.checks + result.expectations
                  if not c.held]
        raise ChaosError(f"the failure-free reference run for {config.key} failed "
                         f"({result.error or '; '.join(failed)}); see {result.run_dir}")
    params = inv.load_params(os.path.join(result.run_dir, "out"))
    losses = {s["step"]: s["loss"] for s in result.timeline["steps"]}
    return Reference(config, next(iter(params.values())), losses, result)


# -- the suite ----------------------------------------------------------------------------------


@dataclass
class Suite:
    scenarios: list[sc.Scenario]
    seeds: list[int]
    report_dir: str
    settings: Settings = field(default_factory=Settings)
    breaks: tuple[str, ...] = ()
    command: str = ""
    progress: Callable[[str], None] = field(default=lambda line: None)
    references: dict[str, Reference] = field(default_factory=dict)  # computed if missing

    def run(self) -> tuple[list[RunResult], dict[str, Reference]]:
        from chaos import report

        started = time.time()
        references = dict(self.references)
        results: list[RunResult] = []
        runs_dir = os.path.join(self.report_dir, "runs")
        for config in {s.train.key: s.train for s in self.scenarios}.values():
            if config.key in references:
                continue
            self.progress(f"reference run for {config.key} ...")
            ref = run_reference(config, self.settings, runs_dir)
            references[config.key] = ref
            self.progress(f"reference: {ref.result.wall_s:.1f}s, final loss "
                          f"{ref.losses.get(config.total_steps, float('nan')):.4g}")
        for scenario in self.scenarios:
            for seed in self.seeds:
                plan = RunPlan(scenario.name, seed, scenario, scenario.schedule(seed),
                               breaks=self.breaks)
                suffix = "-broken-" + "-".join(self.breaks) if self.breaks else ""
                run_dir = os.path.join(runs_dir, f"{scenario.name}-s{seed}{suffix}")
                result = run_one(plan, self.settings, run_dir, references[scenario.train.key])
                results.append(result)
                self.progress(_progress_line(result))
                report.write(self.report_dir, results, references, command=self.command,
                             started=started)
        report.write(self.report_dir, results, references, command=self.command,
                     started=started)
        return results, references


def _progress_line(r: RunResult) -> str:
    held = sum(c.held for c in r.checks)
    bad = [c.name for c in r.checks + r.expectations if not c.held]
    verdict = "PASS" if r.passed else "FAIL"
    return (f"{r.name} seed {r.seed}: {verdict} ({held}/{len(r.checks)} invariants, "
            f"{r.wall_s:.1f}s)" + (f" failed: {', '.join(bad)}" if bad else "")
            + (f" error: {r.error}" if r.error else ""))


# -- command line ---------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_chaos_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "chaos", help="fault-injection suite: run scenarios, check invariants, report",
        description="Run seeded fault scenarios against real elastic jobs and check that "
                    "training stays correct.")
    sub = p.add_subparsers(dest="chaos_command", required=True, metavar="ACTION")

    lp = sub.add_parser("list", help="list the scenarios (and their schedules for a seed)")
    lp.add_argument("--seed", type=int, default=None,
                    help="also print each scenario's fault schedule for this seed")
    lp.add_argument("--json", action="store_true", help="machine-readable output")
    lp.set_defaults(func=cmd_list)

    rp = sub.add_parser("run", help="run scenarios and write a report",
                        description="Exit 0 only if every invariant of every run held.")
    which = rp.add_mutually_exclusive_group(required=True)
    which.add_argument("--scenario", action="append", metavar="NAME",
                       help="a scenario to run (repeatable); see `elastic chaos list`")
    which.add_argument("--all", action="store_true", help="every scenario")
    which.add_argument("--smoke", action="store_true", help="the quick smoke subset")
    rp.add_argument("--seeds", type=_positive_int, default=1, metavar="N",
                    help="run seeds FIRST..FIRST+N-1 of each scenario (default 1)")
    rp.add_argument("--first-seed", type=int, default=0, metavar="FIRST")
    rp.add_argument("--report", default="chaos-report", metavar="DIR",
                    help="report directory (default ./chaos-report)")
    rp.add_argument("--checkpoint-base", default=None, metavar="URL",
                    help="fsspec URL under which each run gets its own checkpoint location "
                         "(default: file:// inside the report directory)")
    rp.add_argument("--lease-ttl", type=_positive_float, default=2.0, metavar="S")
    rp.add_argument("--collective-timeout", type=_positive_float, default=4.0, metavar="S")
    rp.add_argument("--timeout-scale", type=_positive_float, default=1.0, metavar="X",
                    help="multiply every run's time bound (slow machines)")
    rp.add_argument("--tolerance", type=_positive_float, default=inv.DEFAULT_TOLERANCE,
                    help="largest allowed |parameter difference| to the reference (1e-5)")
    rp.add_argument("--etcd-binary", default=None, metavar="PATH")
    rp.add_argument("--break", dest="breaks", action="append", default=[], choices=BREAKS,
                    help="plug a deliberately broken component into every run "
                         "(shows that the checks catch it)")
    rp.set_defaults(func=cmd_run)


def _error(message: str) -> int:
    print(f"elastic chaos: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for s in sc.SCENARIOS.values():
        row: dict[str, Any] = {"name": s.name, "summary": s.summary, "workers": s.workers,
                               "smoke": s.smoke, "bound_s": s.bound_s}
        if args.seed is not None:
            row["schedule"] = s.schedule(args.seed).describe()
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        flag = " [smoke]" if r["smoke"] else ""
        print(f"{r['name']:<{width}}  {r['summary']}{flag}")
        for line in r.get("schedule", ()):
            print(f"{'':<{width}}    - {line}")
    return EXIT_OK


def _check_report_dir(path: str) -> str | None:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        return f"report directory {path!r} is not writable: {exc.strerror or exc}"
    return None


def cmd_run(args: argparse.Namespace) -> int:
    if args.all:
        chosen = list(sc.SCENARIOS.values())
    elif args.smoke:
        chosen = sc.smoke()
    else:
        unknown = [n for n in args.scenario if n not in sc.SCENARIOS]
        if unknown:
            return _error(f"unknown scenario {unknown[0]!r}; known: {', '.join(sc.SCENARIOS)}")
        chosen = [sc.SCENARIOS[n] for n in dict.fromkeys(args.scenario)]
    problem = _check_report_dir(args.report)
    if problem:
        return _error(problem)
    settings = Settings(lease_ttl=args.lease_ttl, collective_timeout=args.collective_timeout,
                        timeout_scale=args.timeout_scale, checkpoint_base=args.checkpoint_base,
                        etcd_binary=args.etcd_binary, tolerance=args.tolerance)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    command = "elastic " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["chaos"] else ""
    suite = Suite(chosen, seeds, args.report, settings, tuple(args.breaks),
                  command=command or f"elastic chaos run ({len(chosen)} scenario(s))",
                  progress=lambda line: print(f"[chaos] {line}", file=sys.stderr, flush=True))
    try:
        results, _ = suite.run()
    except KeyboardInterrupt:
        print("elastic chaos: interrupted; every process it started was stopped",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except ChaosError as exc:
        print(f"elastic chaos: error: {exc}", file=sys.stderr)
        return EXIT_VIOLATION
    failed = [r for r in results if not r.passed]
    print(f"[chaos] {len(results) - len(failed)}/{len(results)} run(s) passed; report in "
          f"{os.path.join(args.report, 'report.md')}", file=sys.stderr)
    return EXIT_OK if not failed else EXIT_VIOLATION


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m chaos.runner ...`` = ``elastic chaos ...``."""
    parser = argparse.ArgumentParser(prog="elastic")
    add_chaos_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
