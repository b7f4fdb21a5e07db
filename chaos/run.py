"""One chaos run: a job under a fault schedule, as real processes, then its verdict.

For a (scenario, seed) the run starts its own embedded etcd (so it can kill,
pause and restart it), launches ``elastic run`` on the chaos workload with a
ledger, an event log and a checkpoint location of its own, follows the event
log (bounded polling) to fire each fault of the schedule at its step or event,
waits for the run to end within its bound, stops everything it started (also
on Ctrl-C and on errors), and checks the invariants and expectations.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chaos import expectations as ex
from chaos import invariants as inv
from chaos import scenarios as sc
from chaos.etcdcluster import EtcdCluster
from chaos.faults import WorkerFaults
from chaos.hosts import Hosts
from chaos.netbed import Host
from chaos.procs import TOKEN_ENV, belongs, processes_with_token
from chaos.results import Reference, RunResult
from chaos.spec import JOINER, KINDS, SERVER, TRIGGERS, FaultSpec, inject
from elastic.base.events import Event, LogFollower
from elastic.base.exitcodes import EXIT_INTERRUPTED, EXIT_STOPPED
from elastic.base.procutil import alive, dying_with_parent, environ_has, send_signal

if TYPE_CHECKING:
    from elastic.coord.jobstate import JobState

__all__ = [
    "ChaosError",
    "EventTail",
    "Reference",
    "Run",
    "RunPlan",
    "RunResult",
    "Settings",
    "processes_with_token",
    "run_one",
    "run_reference",
]

EXIT_OK, EXIT_VIOLATION = 0, 1  # the verdict: every invariant held, or one did not
WORKLOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workload.py")
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
        self._by_name: dict[str, list[dict[str, Any]]] = {}  # a soak logs ~10^5 events

    def poll(self) -> list[dict[str, Any]]:
        new = super().poll()
        self.events.extend(new)
        for e in new:
            self._by_name.setdefault(str(e.get("event")), []).append(e)
        return new

    def of(self, name: Event) -> list[dict[str, Any]]:
        # Keyed by the log's plain strings: an Event hashes and compares as its value.
        return list(self._by_name.get(name, ()))


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
    hosts: Hosts | None = None  # launchers on a test bed's hosts (None: this machine)


# -- processes ----------------------------------------------------------------------------


def _start_etcd(data_dir: str, binary: str | None, host: str, members: int) -> Any:
    """The run's own etcd on ``host``: one embedded member, or a cluster of ``members``."""
    if members > 1:
        return EtcdCluster(data_dir, size=members, host=host, binary=binary).start()
    from elastic.coord.etcd import EmbeddedEtcd

    return EmbeddedEtcd(data_dir=data_dir, binary=binary, host=host, die_with_parent=True).start()


def check_report_dir(path: str) -> str | None:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        return f"report directory {path!r} is not writable: {exc.strerror or exc}"
    return None


def guarded(prog: str, work: Callable[[], int]) -> int:
    """Run a chaos command: Ctrl-C and a run that cannot be carried out end in one line
    and an exit code (every process was stopped by then: see ``Run.execute``)."""
    try:
        return work()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; every process it started was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ChaosError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_VIOLATION


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
    launchers: int | None = None  # default: the scenario's


class Run:
    """One job under a fault schedule: processes, fault firing, artifacts. It is the
    :class:`chaos.spec.Target` faults act on and the :class:`chaos.spec.RunView`
    triggers and expectations read."""

    def __init__(self, plan: RunPlan, settings: Settings, run_dir: str) -> None:
        self.plan = plan
        self.settings = settings
        self.scenario = plan.scenario
        self.workers = plan.workers or self.scenario.workers
        self.launchers = plan.launchers or self.scenario.launchers
        self.collective_timeout = self.scenario.collective_timeout or settings.collective_timeout
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
        self.checkpoint = (
            f"{base.rstrip('/')}/{os.path.basename(run_dir)}-{self.token[:8]}"
            if base
            else "file://" + os.path.join(run_dir, "ckpt")
        )
        self.bound_s = (
            plan.bound_s
            if plan.bound_s is not None
            else self.scenario.bound_s * settings.timeout_scale
        )
        self.commits: list[inv.CommitRecord] | None = None
        self._record_specs: list[FaultSpec] = []  # the spec of each of self.records
        self.ended = False
        self.wall_s = 0.0
        self.deadline = float("inf")  # set when it starts

    # -- Target ------------------------------------------------------------------------

    @property
    def segment(self) -> Segment:
        return self.segments[-1]

    @property
    def schedule(self) -> sc.Schedule:
        return self.plan.schedule

    def poll(self) -> None:
        for seg in self.segments:
            seg.tail.poll()

    def current_events(self) -> list[dict[str, Any]]:
        return self.segment.tail.events

    def events(self, name: Event) -> list[dict[str, Any]]:
        return [e for seg in self.segments for e in seg.tail.of(name)]

    def planned_checkpoints(self) -> list[int]:
        every, total = self.scenario.checkpoint_every, self.scenario.train.total_steps
        return [*range(every, total + 1, every), total]

    def launchers_running(self) -> list[int]:
        return [
            lp.proc.pid
            for lp in self.launched
            if lp.segment == self.segment.index and lp.proc.poll() is None
        ]

    def live_workers(self) -> list[tuple[str, int]]:
        """(member id, pid) of this segment's workers still running (in a World or not)."""
        return [
            (e["member"], int(e["pid"]))
            for e in self.segment.tail.of(Event.SPAWN)
            if belongs(int(e["pid"]), self.token)
        ]

    def spawned_by(self, launcher_pid: int) -> list[tuple[str, int]]:
        source = f"launcher-{launcher_pid}"
        return [
            (e["member"], int(e["pid"]))
            for e in self.events(Event.SPAWN)
            if e.get("source") == source
        ]

    def world(self) -> list[str]:
        gens = self.segment.tail.of(Event.GENERATION)
        return list(gens[-1]["world"]) if gens else []

    def pid_of(self, member: str) -> int | None:
        for seg in self.segments:
            for e in seg.tail.of(Event.SPAWN):
                if e.get("member") == member:
                    return int(e["pid"])
        return None

    def worker(self, rank: int) -> tuple[str, int] | None:
        self.poll()
        world = self.world()
        if rank == JOINER:
            outside = [
                e["member"]
                for seg in self.segments
                for e in seg.tail.of(Event.SPAWN)
                if e["member"] not in world
            ]
            if not outside:
                return None
            member = outside[-1]
        elif rank == SERVER:
            # The spawn event names each process's role; servers are placed
            # by the launcher after its workers, the World orders by member id.
            servers = {
                e["member"]
                for seg in self.segments
                for e in seg.tail.of(Event.SPAWN)
                if e.get("role") == "server"
            }
            found = [m for m in world if m in servers]
            if not found:
                return None
            member = found[0]
        elif not world:
            return None
        else:
            member = world[rank % len(world)]
        pid = self.pid_of(member)
        if pid is None or not environ_has(pid, f"{TOKEN_ENV}={self.token}".encode()):
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
                evicted = any(
                    e.get("event") == Event.GENERATION and member not in e["world"]
                    for e in self.segment.tail.events[since:]
                )
            if evicted and time.monotonic() >= earliest:
                return True
            time.sleep(POLL_S)
        return evicted

    def host_of(self, pid: int) -> Host | None:
        hosts = self.settings.hosts
        return hosts.of_pid(pid) if hosts is not None else None

    def join(self, count: int) -> tuple[str, int]:
        launched = self._launch(self.segment, count, role="join")
        return f"launcher pid {launched.proc.pid} with {count} worker(s)", launched.proc.pid

    def kill_all_and_resume(self) -> str:
        killed_at = time.time()
        victims = self._stop_processes()
        self.poll()
        self.snapshots.append(inv.inspect_store(self.checkpoint))
        seg = self._new_segment(resume=True)
        self.resume_recoveries.append((killed_at, seg.index))
        newest = max(self.snapshots[-1].committed, default=None)
        return (
            f"killed {victims} process(es); resuming as job {seg.job} "
            f"(newest committed step {newest})"
        )

    # -- lifecycle ------------------------------------------------------------------------

    def _new_segment(self, resume: bool) -> Segment:
        index = len(self.segments)
        job = f"chaos-{self.token[:8]}-{index}"
        seg = Segment(
            index,
            job,
            EventTail(os.path.join(self.run_dir, f"events-{index}.jsonl")),
            os.path.join(self.run_dir, "ledger", f"seg{index}"),
            resume,
            time.time(),
        )
        self.segments.append(seg)
        shares = [
            self.workers // self.launchers + (i < self.workers % self.launchers)
            for i in range(self.launchers)
        ]
        self._launch(seg, shares[0], role="main")
        for share in shares[1:]:
            # The first launcher creates the job; the others join it as other hosts.
            self._await_first_world(seg)
            self._launch(seg, share, role="host")
        return seg

    def _await_first_world(self, seg: Segment) -> None:
        deadline = time.monotonic() + max(30.0, self.bound_s / 2)
        while not seg.tail.of(Event.GENERATION):
            if time.monotonic() > deadline or not self._launchers_running():
                raise ChaosError(f"job {seg.job}: no World formed before starting another launcher")
            time.sleep(POLL_S)
            seg.tail.poll()

    def _launch(self, seg: Segment, nproc: int, role: str) -> Launched:
        s, plan = self.settings, self.plan
        cmd = [
            s.python,
            "-m",
            "elastic.cli",
            "run",
            "--etcd",
            self.etcd.url,
            "--job",
            seg.job,
            "-n",
            str(nproc),
            "--event-log",
            seg.tail.path,
            "--ledger-dir",
            seg.ledger,
            "--checkpoint",
            self.checkpoint,
            "--checkpoint-every",
            str(self.scenario.checkpoint_every),
            "--lease-ttl",
            str(s.lease_ttl),
            "--collective-timeout",
            str(self.collective_timeout),
            "--settle",
            str(self.scenario.settle_s),
            "--max-restarts",
            str(s.max_restarts),
            "--min-workers",
            str(self.scenario.min_workers),
            "--join-timeout",
            str(max(30.0, self.bound_s)),
            *self.scenario.launcher_args,
        ]
        if seg.resume and role == "main":
            cmd.append("--resume")
        step_time = plan.step_time if plan.step_time is not None else self.scenario.step_time
        cmd += [
            s.workload,
            "--out-dir",
            self.out_dir,
            "--step-time",
            str(step_time),
            *self.scenario.train.args(),
        ]
        for b in plan.breaks:
            cmd += ["--break", b]
        sched = plan.schedule
        env = dict(os.environ)
        env.update(
            WorkerFaults(
                storage=sched.storage,
                seed=plan.seed or 0,
                slow_step_s=sched.slow_step_s,
                slow_steps=sched.slow_steps,
                record_dir=self.faults_dir,
            ).to_env()
        )
        env[TOKEN_ENV] = self.token
        env["PYTHONUNBUFFERED"] = "1"
        log = os.path.join(self.run_dir, "logs", f"launcher-{len(self.launched)}-{role}.log")
        if s.hosts is not None:
            # The launcher finds its address from its route to etcd, as on a
            # real machine: nothing host-specific is passed.
            cmd = [*s.hosts.place(len(self.launched)).prefix(), *cmd]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                dying_with_parent(cmd),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
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
            left = {p for p in victims | processes_with_token(self.token) if alive(p)}
            if not left or time.monotonic() > deadline:
                break
            victims = left
            time.sleep(POLL_S)
        return running

    def _launchers_running(self) -> bool:
        return bool(self.launchers_running())

    def _etcd_client(self) -> Any:
        if self._client is None:
            from elastic.coord.etcd import EtcdConfig, connect

            self._client = connect(
                EtcdConfig.from_url(self.etcd.url, rpc_timeout=2.0, connect_timeout=10.0)
            )
        return self._client

    def _job_state(self) -> JobState | None:
        """The job's keys in etcd; None while etcd does not answer or holds none yet."""
        from elastic.coord.etcd import TRANSIENT_ERRORS
        from elastic.coord.jobstate import read_job_state
        from elastic.coord.keys import Keyspace

        try:
            return read_job_state(self._etcd_client(), Keyspace(self.segment.job))
        except TRANSIENT_ERRORS:
            return None

    def rendezvous_in_progress(self) -> bool:
        state = self._job_state()
        if state is None:
            return False
        return state.round > state.generation or bool(state.members.keys() - state.world_ids)

    def joiner_ready(self) -> bool:
        state = self._job_state()
        return state is not None and bool(
            (state.members.keys() & state.ready.keys()) - state.world_ids
        )

    def _await(self, spec: FaultSpec, since: int, deadline: float) -> bool:
        """Wait (bounded) for the trigger of ``spec``; False if the run ended first."""
        seg_index = self.segment.index
        trigger = TRIGGERS[spec.on]
        while time.monotonic() < deadline:
            self.poll()
            if self.segment.index != seg_index:
                return False
            if trigger.hit(spec, self, since):
                return True
            if not self._launchers_running():
                return False
            time.sleep(POLL_S)
        return False

    def execute(self) -> None:
        os.makedirs(os.path.join(self.run_dir, "logs"), exist_ok=True)
        self._etcd_dir = tempfile.mkdtemp(prefix="chaos-etcd-")
        started = time.monotonic()
        deadline = self.deadline = started + self.bound_s
        try:
            host = (
                self.settings.hosts.control.address
                if self.settings.hosts is not None
                else "127.0.0.1"
            )
            self.etcd = _start_etcd(
                self._etcd_dir, self.settings.etcd_binary, host, self.scenario.etcd_members
            )
            self._new_segment(resume=False)
            for spec in self._specs():
                since = len(self.segment.tail.events)
                if self.records and self.records[-1].get("segment") == self.segment.index:
                    since = self.records[-1].get("event_index", since)
                if not self._await(spec, since, deadline):
                    self.records.append(
                        {
                            "kind": spec.kind,
                            "fault": spec.describe(),
                            "fired": False,
                            "t": time.time(),
                            "detail": "trigger not reached before the run ended",
                        }
                    )
                    self._record_specs.append(spec)
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
                self._record_specs.append(spec)
            while time.monotonic() < deadline and self._launchers_running():
                time.sleep(POLL_S)
            self.ended = not self._launchers_running()
            self.wall_s = time.monotonic() - started
        finally:
            self.wall_s = self.wall_s or time.monotonic() - started
            self._finish()

    def _specs(self) -> Iterator[FaultSpec]:
        """The faults to fire, in order (the soak draws them as it goes)."""
        yield from self.plan.schedule.faults

    def _last_step(self) -> int | None:
        steps = self.segment.tail.of(Event.STEP)
        return steps[-1]["step"] if steps else None

    def _finish(self) -> None:
        try:
            self._stop_processes()
        finally:
            try:
                self.poll()
                if self.etcd is not None:
                    self.etcd.resume()  # left paused or down by a fault
                    self.etcd.start()
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
        restores = [
            inv.Restore(e["t"], e["step"], seg.index)
            for seg in self.segments
            for e in seg.tail.of(Event.RESTORE)
        ]
        resumed = [seg.index for seg in self.segments if seg.resume]
        unfinished = self._unfinished()
        if reference is not None:
            params = inv.check_params(finals, reference.params, self.settings.tolerance, unfinished)
        else:
            params = _self_consistent(finals, self.settings.tolerance, unfinished)
        checks = [
            params,
            inv.check_exactly_once(records, expected, total),
            inv.check_checkpoints(
                final_store, self.snapshots, restores, resumed, total, sched.corrupted_on_purpose
            ),
            inv.check_fencing(self.commits, final_store),
            inv.check_no_hang(
                self.ended, self.wall_s, self.bound_s, [lp.proc.returncode for lp in self.launched]
            ),
        ]
        if self.commits is None:
            checks[3] = inv.Check(
                inv.FENCING,
                False,
                "etcd history unavailable: " + getattr(self, "commit_error", "unknown error"),
            )
        expectations = self._expectations(final_store)
        recovery = [float(e["seconds"]) for e in self.events(Event.RECOVERED)]
        for killed_at, index in self.resume_recoveries:
            steps = self.segments[index].tail.of(Event.STEP)
            if steps:
                recovery.append(round(steps[0]["t"] - killed_at, 3))
        return RunResult(
            name=plan.name,
            seed=plan.seed,
            breaks=plan.breaks,
            schedule=sched.describe(),
            schedule_json=sched.to_json(),
            faults=self.records,
            checks=checks,
            expectations=expectations,
            recovery_s=recovery,
            steps_redone=inv.steps_redone(records),
            wall_s=self.wall_s,
            bound_s=self.bound_s,
            exit_codes=[lp.proc.returncode for lp in self.launched],
            run_dir=self.run_dir,
            timeline=self._timeline(),
            config_key=train.key,
            warnings=self._warnings(),
        )

    def _warnings(self) -> list[str]:
        """Workers that died although no fault was aimed at them (crashes of the runtime)."""
        targets = {r.get("member") for r in self.records}
        targets |= {m for r in self.records for m in r.get("members", ())}
        out = []
        for seg in self.segments:
            for e in seg.tail.of(Event.EXIT):
                if e.get("rc") not in (0, EXIT_STOPPED) and e["member"] not in targets:
                    out.append(
                        f"worker {e['member']} exited with {e['rc']} without being "
                        f"targeted (segment {seg.index}; see its launcher log)"
                    )
        return out

    def _unfinished(self) -> str | None:
        """Why the job did not finish, or None: rank 0 of its last launch reported
        ``finished`` and every launcher of that launch ended without an error (exit 0,
        or 3: its workers left while the job went on elsewhere)."""
        killed = {p for r in self.records for p in r.get("launchers_killed", ())}
        last = [
            lp
            for lp in self.launched
            if lp.segment == self.segment.index and lp.proc.pid not in killed
        ]
        codes = [lp.proc.returncode for lp in last]
        problems = []
        if not self.segment.tail.of(Event.FINISHED):
            problems.append("rank 0 never reported 'finished'")
        # Launchers the runner stopped at the bound are the no-hang invariant's finding.
        if self.ended and any(c not in (0, EXIT_STOPPED) for c in codes):
            shown = ", ".join("killed" if c is None else str(c) for c in codes)
            problems.append(f"launcher exit code(s) {shown}")
        gave_up = self.segment.tail.of(Event.GIVE_UP)
        if gave_up:
            problems.append(
                f"the launcher gave up on {gave_up[0].get('member')} (no restarts left)"
            )
        return "; ".join(problems) or None

    def _expectations(self, store: inv.StoreState) -> list[inv.Check]:
        names = [ex.EXPECT_FAULTS_FIRED, *self.scenario.expect]
        checks = [c for name in names for c in ex.EXPECTATIONS[name].check(self, store)]
        for spec, record in zip(self._record_specs, self.records, strict=True):
            if record.get("fired"):
                checks += KINDS[spec.kind].expect(spec, record, self)
        return checks

    def _timeline(self) -> dict[str, Any]:
        steps = [
            {
                "seg": seg.index,
                "t": e["t"],
                "step": e["step"],
                "loss": e["loss"],
                "world": e["world"],
                "gen": e["gen"],
            }
            for seg in self.segments
            for e in seg.tail.of(Event.STEP)
        ]
        faults = [
            {
                "t": r["t"],
                "step": r.get("step"),
                "seg": r.get("segment"),
                "kind": r["kind"],
                "fired": r.get("fired", False),
            }
            for r in self.records
        ]
        t0 = min((seg.started for seg in self.segments), default=0.0)
        return {"t0": t0, "steps": steps, "faults": faults}


def _self_consistent(
    finals: dict[str, dict[str, Any]], tolerance: float, unfinished: str | None
) -> inv.Check:
    """For the reference itself: every finisher holds the same parameters."""
    if unfinished:
        return inv.Check(inv.PARAMS, False, f"the job did not finish: {unfinished}")
    if not finals:
        return inv.Check(inv.PARAMS, False, "no worker finished training")
    first = next(iter(finals.values()))
    worst = max(inv.max_param_diff(p, first) for p in finals.values())
    return inv.Check(
        inv.PARAMS,
        worst <= tolerance,
        f"reference: {len(finals)} finisher(s) agree within {worst:.2e}",
    )


def run_one(
    plan: RunPlan,
    settings: Settings,
    run_dir: str,
    reference: Reference | None,
    make: Callable[[RunPlan, Settings, str], Run] | None = None,
) -> RunResult:
    """Carry out one run (``make`` builds it: a :class:`Run` unless told otherwise)."""
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    run = (make or Run)(plan, settings, run_dir)
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
        name=plan.name,
        seed=plan.seed,
        breaks=plan.breaks,
        schedule=plan.schedule.describe(),
        schedule_json=plan.schedule.to_json(),
        faults=run.records,
        checks=checks,
        expectations=[],
        recovery_s=[],
        steps_redone=0,
        wall_s=run.wall_s,
        bound_s=run.bound_s,
        exit_codes=[lp.proc.returncode for lp in run.launched],
        run_dir=run.run_dir,
        timeline={"t0": 0.0, "steps": [], "faults": []},
        config_key=plan.scenario.train.key,
        error=error,
    )


def run_reference(config: sc.TrainConfig, settings: Settings, work_dir: str) -> Reference:
    # The bound grows with the training: a soak's reference trains tens of
    # thousands of steps (a fixed 120 s stopped a 6,648-step one at 4,481).
    bound = max(sc.Scenario.bound_s, 60.0 + config.total_steps * (4 * REFERENCE_STEP_TIME + 0.05))
    scenario = sc.Scenario(
        "reference",
        "failure-free run",
        lambda rng, s: sc.Schedule(),
        train=config,
        step_time=REFERENCE_STEP_TIME,
        workers=REFERENCE_WORKERS,
        bound_s=round(bound, 1),
    )
    plan = RunPlan("reference", None, scenario, sc.Schedule())
    result = run_one(plan, settings, os.path.join(work_dir, "reference-" + config.key), None)
    if not result.passed:
        failed = [
            f"{c.name}: {c.detail}" for c in result.checks + result.expectations if not c.held
        ]
        raise ChaosError(
            f"the failure-free reference run for {config.key} failed "
            f"({result.error or '; '.join(failed)}); see {result.run_dir}"
        )
    params = inv.load_params(os.path.join(result.run_dir, "out"))
    losses = {s["step"]: s["loss"] for s in result.timeline["steps"]}
    return Reference(config, next(iter(params.values())), losses, result)
