"""Recovery from each kind of failure: this runtime vs torchrun (issue 9).

    python benchmarks/failures.py [--faults kill,freeze,...] [--trials 5] [--workers 3]
                                  [--curve 3,8,16] [--out bench-out/failures]

Same model, data, global batch and simulated step time on both sides
(benchmarks/bench_workload.py); `elastic run` with its default settings (lease
TTL 5 s, collective timeout 30 s, hang floor 5 s, 3 restarts). Each trial
trains ``--steps`` steps, injects the fault at step ``--fault-step`` of a full
World and lets the job finish. Faults:

  kill              SIGKILL one worker (rank 1, then rank 0, alternating)
  freeze            SIGSTOP rank 1; SIGCONT once a World without it formed
  hang              rank 1's training thread blocks forever (SIGUSR1 handler),
                    its other threads live
  host-loss         the job as 2-3 launchers ("hosts"); SIGKILL the launcher
                    of rank 1 together with its workers
  link-down         3 hosts as network namespaces (root only), etcd on host 0;
                    host 2's link goes down
  etcd-leader-loss  a 3-member etcd cluster on loopback; SIGKILL its leader

Measured per trial, from the JSONL event log: seconds from the fault to the
first step of a newer generation (etcd-leader-loss: the longest pause between
steps from the fault on, as no World change is needed), steps redone (step
numbers completed more than once), whether the job finished, and the final
parameters' max abs difference from a failure-free run of the same size
(tolerance 1e-5, chaos.invariants). torchrun (c10d rendezvous, --max-restarts
3, checkpoint every 20 steps, TORCH_GLOO_LAZY_INIT=1 unless
--torchrun-default-gloo) runs under kill, freeze, hang and host-loss (one
agent per host, the first hosting the c10d store; the last dies): seconds from the
fault to the first step of a restarted attempt, steps redone. A trial with no
such step within --give-up seconds counts as not recovered; after
--stop-after such trials in a row the rest of that fault's trials on that
side are not run (torchrun has no detector for a freeze or a hang short of
gloo's 30 min timeout: each of those trials costs the whole give-up).
``--curve`` repeats the kill at each worker count (--curve-trials times;
the recovery alone: the job is stopped once it recovered). ``--faults ''``
runs the curve only.

Writes failures.json (every trial) and failures.md (the tables) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from benchmarks.recovery import (  # noqa: E402
    Group,
    elastic_cmd,
    last_step_before,
    reached,
    signal_local_rank,
    steps_of,
    steps_redone,
    trial_torchrun,
    wait_for,
    workers_of,
)
from chaos.etcdcluster import EtcdCluster  # noqa: E402
from chaos.invariants import DEFAULT_TOLERANCE, load_params, max_param_diff  # noqa: E402
from elastic.base.events import Event, read_events  # noqa: E402
from elastic.base.procutil import descendants, kill_all, send_signal  # noqa: E402
from elastic.coord.etcd import EmbeddedEtcd  # noqa: E402

FAULTS = ("kill", "freeze", "hang", "host-loss", "link-down", "etcd-leader-loss")
TORCHRUN_FAULTS = ("kill", "freeze", "hang", "host-loss")


@dataclass(frozen=True)
class BenchConfig:
    faults: tuple[str, ...] = FAULTS
    trials: int = 5
    workers: int = 3
    curve: tuple[int, ...] = ()
    curve_trials: int = 3
    steps: int = 120
    fault_step: int = 30
    step_time: float = 0.05
    give_up: float = 75.0
    # Stop a side's trials of one fault after this many unrecovered in a row
    # (0: never): torchrun under freeze or hang spends the whole give-up each time.
    stop_after: int = 2
    job_timeout: float = 180.0
    torchrun: bool = True
    torchrun_lazy: bool = True
    out: str = "bench-out/failures"

    def __post_init__(self) -> None:
        unknown = [f for f in self.faults if f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown fault {unknown[0]!r} (known: {', '.join(FAULTS)})")
        for name in ("trials", "curve_trials"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.workers < 2:
            raise ValueError(f"--workers must be >= 2 (one to lose), got {self.workers}")
        if any(n < 2 for n in self.curve):
            raise ValueError(f"--curve worker counts must be >= 2, got {list(self.curve)}")
        if not 0 < self.fault_step < self.steps - 20:
            raise ValueError(
                f"--fault-step {self.fault_step} must leave 20 steps of the "
                f"{self.steps} to recover in"
            )
        if self.stop_after < 0:
            raise ValueError(f"--stop-after must be >= 0, got {self.stop_after}")
        for name in ("give_up", "job_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
        if self.step_time < 0:
            raise ValueError(f"--step-time must be >= 0, got {self.step_time}")

    def hosts(self, workers: int) -> list[int]:
        """Workers per launcher when the job runs as several "hosts" (2 or 3)."""
        n = min(3, workers)
        return [workers // n + (1 if i < workers % n else 0) for i in range(n)]


# -- one elastic job, as launchers sharing one event log ----------------------------


@dataclass
class ElasticJob:
    job: str
    log: str
    out_dir: str
    workers: int
    group: Group = field(default_factory=Group)
    launchers: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def new(cls, tmp: str, workers: int) -> ElasticJob:
        job = f"bf{uuid.uuid4().hex[:8]}"
        return cls(
            job, os.path.join(tmp, f"{job}.jsonl"), os.path.join(tmp, f"{job}.final"), workers
        )

    def cmd(self, etcd: str, n: int, cfg: BenchConfig, hangable: bool = False) -> list[str]:
        script = ["--out-dir", self.out_dir] + (["--hangable"] if hangable else [])
        return elastic_cmd(
            self.job, etcd, self.log, n, cfg.steps, cfg.step_time, script_args=script
        )

    def start(self, etcd: str, n: int, cfg: BenchConfig, hangable: bool = False) -> None:
        out = os.path.join(os.path.dirname(self.log), f"{self.job}.{len(self.launchers)}.out")
        self.launchers.append(
            self.group.start(self.cmd(etcd, n, cfg, hangable), dict(os.environ), out)
        )

    def events(self) -> list[dict]:
        return read_events(self.log, missing_ok=True)

    def world(self) -> tuple[int, list[str]]:
        gen = [e for e in self.events() if e["event"] == Event.GENERATION][-1]
        return gen["gen"], gen["world"]

    def spawn_of(self, member: str) -> dict:
        return [
            e for e in self.events() if e["event"] == Event.SPAWN and e.get("member") == member
        ][-1]

    def wait_full(self, at_step: int) -> bool:
        """Until a World of every worker completed step ``at_step``."""
        return reached(self.log, at_step, self.workers)

    def wait_finished(self, launchers: list[subprocess.Popen], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for p in launchers:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return any(e["event"] == Event.FINISHED for e in self.events())

    def close(self) -> None:
        self.group.close()


@dataclass
class Injected:
    """What a fault did: when, and which launchers will not finish because of it."""

    t: float
    lost: list[subprocess.Popen] = field(default_factory=list)
    # Run once the job recovered (or gave up), e.g. thaw a frozen worker.
    after: Callable[[], None] = lambda: None
    detail: dict[str, Any] = field(default_factory=dict)  # goes into the trial's record


ElasticFault = Callable[[ElasticJob, int], Injected]


def _signal_member(sig: int, pick: Callable[[int], int]) -> ElasticFault:
    def inject(job: ElasticJob, trial: int) -> Injected:
        _, world = job.world()
        rank = pick(trial)
        pid = job.spawn_of(world[rank])["pid"]
        t = time.time()
        os.kill(pid, sig)
        return Injected(t, detail={"victim_rank": rank})

    return inject


def _alternate(trial: int) -> int:
    return 1 if trial % 2 == 0 else 0


def freeze(job: ElasticJob, trial: int) -> Injected:
    gen, world = job.world()
    victim = world[1]
    pid = job.spawn_of(victim)["pid"]
    t = time.time()
    os.kill(pid, signal.SIGSTOP)

    def thaw() -> None:
        # Thawed once evicted (a World without it), or at give-up at the latest.
        wait_for(
            lambda: [
                e
                for e in job.events()
                if e["event"] == Event.GENERATION and e["gen"] > gen and victim not in e["world"]
            ],
            5,
        )
        send_signal(pid, signal.SIGCONT)

    return Injected(t, after=thaw)


def host_loss(job: ElasticJob, trial: int) -> Injected:
    _, world = job.world()
    spawn = job.spawn_of(world[1])
    launcher_pid = int(spawn["source"].split("-", 1)[1])
    launcher = next(p for p in job.launchers if p.pid == launcher_pid)
    # A machine dies all at once: its launcher cannot revoke its workers' leases.
    return Injected(kill_tree(launcher_pid), lost=[launcher])


def kill_tree(root: int) -> float:
    """SIGKILL ``root`` and everything below it at once; the time it happened."""
    doomed = [root, *descendants(root)]
    t = time.time()
    kill_all(doomed)
    return t


# -- measuring one elastic trial ------------------------------------------------------


def measure(
    job: ElasticJob,
    cfg: BenchConfig,
    trial: int,
    inject: ElasticFault,
    reference: dict | None,
    reform: bool = True,
    finish: bool = True,
) -> dict:
    """Fault at step ``cfg.fault_step`` of a full World, then let the job finish
    and compare its parameters with ``reference`` (unless ``finish`` is False:
    the recovery alone)."""
    if not job.wait_full(cfg.fault_step):
        return {"recovered": False, "error": f"no full World reached step {cfg.fault_step}"}
    gen, _ = job.world()
    injected = inject(job, trial)
    try:
        after = wait_for(
            lambda: [
                e
                for e in steps_of(job.events())
                if e["t"] > injected.t and (e["gen"] > gen or not reform)
            ],
            cfg.give_up,
        )
    finally:
        injected.after()
    survivors = [p for p in job.launchers if p not in injected.lost]
    finished = finish and job.wait_finished(survivors, cfg.job_timeout)
    events = job.events()
    out: dict[str, Any] = {
        "recovered": bool(after),
        "redone": steps_redone(events),
        "fault_at_step": last_step_before(events, injected.t),
        **injected.detail,
    }
    if after:
        out["seconds"] = after[0]["t"] - injected.t if reform else longest_pause(events, injected.t)
    if not finish:
        return out
    out["finished"] = finished
    finals = load_params(job.out_dir) if os.path.isdir(job.out_dir) else {}
    if finals and reference is not None:
        out["max_abs_diff"] = max(max_param_diff(p, reference) for p in finals.values())
        out["params_equal"] = out["max_abs_diff"] <= DEFAULT_TOLERANCE
    else:
        out["params_equal"] = False
    return out


def longest_pause(events: list[dict], since: float) -> float:
    times = [since] + sorted(e["t"] for e in steps_of(events) if e["t"] > since)
    return max(b - a for a, b in zip(times, times[1:], strict=False))


def reference_params(tmp: str, etcd: str, workers: int, cfg: BenchConfig) -> dict | None:
    job = ElasticJob.new(tmp, workers)
    try:
        job.start(etcd, workers, cfg)
        if not job.wait_finished(job.launchers, cfg.job_timeout):
            return None
        finals = load_params(job.out_dir)
        return next(iter(finals.values()), None)
    finally:
        job.close()


# -- the elastic side of each fault ---------------------------------------------------


class Runner:
    def __init__(self, cfg: BenchConfig, tmp: str, etcd: EmbeddedEtcd) -> None:
        self.cfg = cfg
        self.tmp = tmp
        self.etcd = etcd
        self._refs: dict[int, dict | None] = {}

    def reference(self, workers: int) -> dict | None:
        if workers not in self._refs:
            self._refs[workers] = reference_params(self.tmp, self.etcd.url, workers, self.cfg)
        return self._refs[workers]

    def local(
        self,
        trial: int,
        inject: ElasticFault,
        workers: int | None = None,
        hangable: bool = False,
        finish: bool = True,
    ) -> dict:
        workers = workers or self.cfg.workers
        ref = self.reference(workers) if finish else None
        job = ElasticJob.new(self.tmp, workers)
        try:
            job.start(self.etcd.url, workers, self.cfg, hangable)
            return measure(job, self.cfg, trial, inject, ref, finish=finish)
        finally:
            job.close()

    def kill(self, trial: int, workers: int | None = None, finish: bool = True) -> dict:
        return self.local(trial, _signal_member(signal.SIGKILL, _alternate), workers, finish=finish)

    def freeze(self, trial: int) -> dict:
        return self.local(trial, freeze)

    def hang(self, trial: int) -> dict:
        return self.local(trial, _signal_member(signal.SIGUSR1, lambda _: 1), hangable=True)

    def host_loss(self, trial: int) -> dict:
        ref = self.reference(self.cfg.workers)
        job = ElasticJob.new(self.tmp, self.cfg.workers)
        try:
            for n in self.cfg.hosts(self.cfg.workers):
                job.start(self.etcd.url, n, self.cfg)
            return measure(job, self.cfg, trial, host_loss, ref)
        finally:
            job.close()

    def etcd_leader_loss(self, trial: int) -> dict:
        ref = self.reference(self.cfg.workers)
        job = ElasticJob.new(self.tmp, self.cfg.workers)
        with EtcdCluster(os.path.join(self.tmp, f"{job.job}-etcd")) as cluster:
            try:
                job.start(cluster.url, self.cfg.workers, self.cfg)

                def kill_leader(job: ElasticJob, trial: int) -> Injected:
                    leader = cluster.leader()
                    t = time.time()
                    cluster.kill_member(leader)
                    # Which of the --etcd endpoints (clients start on the first).
                    return Injected(t, detail={"killed_leader": cluster.urls.index(leader)})

                return measure(job, self.cfg, trial, kill_leader, ref, reform=False)
            finally:
                job.close()

    def link_down(self, trial: int) -> dict:
        from tests.helpers import netns

        why = netns.unavailable()
        if why is not None:
            return {"skipped": why}
        ref = self.reference(self.cfg.workers)
        job = ElasticJob.new(self.tmp, self.cfg.workers)
        env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
        with netns.TestBed(3) as bed:
            try:
                url = bed.etcd_single(os.path.join(self.tmp, f"{job.job}-etcd"))
                for host, n in zip(bed.hosts, self.cfg.hosts(self.cfg.workers), strict=False):
                    with open(os.path.join(self.tmp, f"{job.job}.h{host.index}.out"), "ab") as f:
                        job.launchers.append(
                            host.run(
                                job.cmd(url, n, self.cfg),
                                env=env,
                                cwd=self.tmp,
                                stdout=f,
                                stderr=subprocess.STDOUT,
                            )
                        )
                job.group.procs.extend(job.launchers)
                cut = bed.hosts[-1]

                def pull_cable(job: ElasticJob, trial: int) -> Injected:
                    t = time.time()
                    cut.link_down()
                    return Injected(t, lost=[job.launchers[-1]])

                return measure(job, self.cfg, trial, pull_cable, ref)
            finally:
                job.close()

    def elastic(self, fault: str, trial: int) -> dict:
        return getattr(self, fault.replace("-", "_"))(trial)

    def torchrun(self, fault: str, trial: int) -> dict:
        cfg = self.cfg
        common = dict(
            step_time=cfg.step_time,
            give_up=cfg.give_up,
            lazy=cfg.torchrun_lazy,
            at_step=cfg.fault_step,
        )
        if fault == "kill":
            return trial_torchrun(
                self.tmp,
                nproc=cfg.workers,
                **common,
                fault=signal_local_rank(signal.SIGKILL, _alternate(trial)),
            )
        if fault == "freeze":
            return trial_torchrun(
                self.tmp, nproc=cfg.workers, **common, fault=signal_local_rank(signal.SIGSTOP)
            )
        if fault == "hang":
            return trial_torchrun(
                self.tmp,
                nproc=cfg.workers,
                **common,
                fault=signal_local_rank(signal.SIGUSR1),
                script_args=["--hangable"],
            )
        hosts = cfg.hosts(cfg.workers)
        if len(set(hosts)) != 1:
            return {
                "skipped": f"torchrun needs the same workers per host; {cfg.workers} "
                f"workers on {len(hosts)} hosts are not"
            }
        return trial_torchrun(
            self.tmp, nproc=hosts[0], agents=len(hosts), **common, fault=kill_last_agent
        )


def kill_last_agent(agents: list[subprocess.Popen], log: str) -> float | str:
    """A host loss for torchrun: its last agent (not the one hosting the c10d
    store) and that agent's workers, SIGKILLed together."""
    victim = agents[-1]
    if not workers_of(victim, log, 0):
        return "the last agent has no worker"
    return kill_tree(victim.pid)


# -- report -----------------------------------------------------------------------------


def summary(trials: list[dict]) -> dict[str, Any]:
    run = [t for t in trials if "skipped" not in t]
    if not run:
        return {"skipped": trials[0]["skipped"] if trials else "not run"}
    ok = [t for t in run if t.get("recovered")]
    secs = [t["seconds"] for t in ok]
    out: dict[str, Any] = {"trials": len(run), "recovered": len(ok)}
    if secs:
        out.update(median_s=statistics.median(secs), min_s=min(secs), max_s=max(secs))
    if ok:
        out["redone"] = [t["redone"] for t in ok]
    if any("params_equal" in t for t in run):
        out["params_equal"] = sum(bool(t.get("params_equal")) for t in run)
        diffs = [t["max_abs_diff"] for t in run if "max_abs_diff" in t]
        out["max_abs_diff"] = max(diffs) if diffs else None
        out["finished"] = sum(bool(t.get("finished")) for t in run)
    return out


def _seconds(s: dict) -> str:
    if "skipped" in s:
        return "skipped"
    if "median_s" not in s:
        return "not recovered"
    return f"{s['median_s']:.2f} ({s['min_s']:.2f}-{s['max_s']:.2f})"


def _redone(s: dict) -> str:
    values = s.get("redone")
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{statistics.median(values):g} ({lo}-{hi})"


def _recovered(s: dict) -> str:
    if "trials" not in s:
        return "-"
    return f"{s['recovered']}/{s['trials']}" + (" (stopped)" if s.get("stopped_early") else "")


def _params(s: dict) -> str:
    if "params_equal" not in s:
        return "-"
    diff = s.get("max_abs_diff")
    return f"{s['params_equal']}/{s['trials']}" + ("" if diff is None else f" ({diff:.1e})")


def markdown(cfg: BenchConfig, results: dict[str, Any]) -> str:
    lines = [
        f"Failure recovery, {cfg.trials} trial(s) per fault, {cfg.workers} workers, "
        f"{cfg.steps} steps, fault at step {cfg.fault_step}, {cfg.step_time}s simulated "
        f"compute per step; `elastic run` defaults; torchrun c10d, --max-restarts 3, "
        f"checkpoint every 20 steps"
        + (", TORCH_GLOO_LAZY_INIT=1" if cfg.torchrun_lazy else ", default gloo")
        + ".",
        "Seconds: fault -> next completed step (etcd-leader-loss: longest pause between "
        f"steps after the fault); median (min-max) over recovered trials; not recovered: no "
        f"such step within {cfg.give_up:g} s ((stopped): the rest of the trials were not run "
        f"after {cfg.stop_after} such in a row). Final params: "
        f"trials whose final parameters equal the failure-free run within {DEFAULT_TOLERANCE:g} "
        "(largest max abs diff).",
    ]
    if cfg.faults:
        lines += [
            "",
            "| fault | this runtime median s (min-max) | redone | recovered "
            "| final params | torchrun median s | redone | recovered |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for fault in cfg.faults:
        e = results["elastic"][fault]["summary"]
        t = results["torchrun"].get(fault, {}).get("summary", {"skipped": "does not apply"})
        if not cfg.torchrun and fault in TORCHRUN_FAULTS:
            t = {"skipped": "not run"}
        reason = e.get("skipped")
        lines.append(
            f"| {fault} | {_seconds(e)}"
            + (f": {reason}" if reason else "")
            + f" | {_redone(e)} | {_recovered(e)} | {_params(e)} | "
            + ("does not apply" if fault not in TORCHRUN_FAULTS else _seconds(t))
            + f" | {_redone(t)} | {_recovered(t)} |"
        )
    if cfg.curve:
        lines += [
            "",
            f"Kill curve ({cfg.curve_trials} trial(s) per size, recovery only):",
            "",
            "| workers | median s (min-max) | redone | recovered |",
            "|---|---|---|---|",
        ]
        for n in cfg.curve:
            s = results["curve"][str(n)]["summary"]
            lines.append(f"| {n} | {_seconds(s)} | {_redone(s)} | {_recovered(s)} |")
    return "\n".join(lines) + "\n"


# -- main -------------------------------------------------------------------------------


@contextmanager
def workspace() -> Iterator[tuple[str, EmbeddedEtcd]]:
    with (
        tempfile.TemporaryDirectory(prefix="bench-failures-") as tmp,
        EmbeddedEtcd(data_dir=os.path.join(tmp, "etcd"), die_with_parent=True) as etcd,
    ):
        yield tmp, etcd


def run(cfg: BenchConfig) -> dict[str, Any]:
    results: dict[str, Any] = {"config": asdict(cfg), "elastic": {}, "torchrun": {}, "curve": {}}
    with workspace() as (tmp, etcd):
        runner = Runner(cfg, tmp, etcd)
        for fault in cfg.faults:
            sides = [("elastic", runner.elastic)]
            if cfg.torchrun and fault in TORCHRUN_FAULTS:
                sides.append(("torchrun", runner.torchrun))
            for side, fn in sides:
                results[side][fault] = repeat(
                    cfg, f"{side} {fault}", lambda i, f=fault, fn=fn: fn(f, i)
                )
        # The curve measures the recovery alone: no run to the end, no reference.
        for n in cfg.curve:
            results["curve"][str(n)] = repeat(
                cfg,
                f"curve {n} workers",
                lambda i, n=n: runner.kill(i, workers=n, finish=False),
                trials=cfg.curve_trials,
            )
    return results


def repeat(
    cfg: BenchConfig, label: str, trial: Callable[[int], dict], trials: int | None = None
) -> dict[str, Any]:
    n = cfg.trials if trials is None else trials
    done: list[dict] = []
    for i in range(n):
        t0 = time.monotonic()
        r = trial(i)
        r["wall_s"] = round(time.monotonic() - t0, 1)
        done.append(r)
        print(f"{label} trial {i + 1}/{n}: {r}", file=sys.stderr, flush=True)
        if "skipped" in r:
            break
        tail = done[-cfg.stop_after :] if cfg.stop_after else []
        if len(tail) == cfg.stop_after and not any(t.get("recovered") for t in tail) and i + 1 < n:
            print(
                f"{label}: {cfg.stop_after} unrecovered in a row, stopping",
                file=sys.stderr,
                flush=True,
            )
            break
    s = summary(done)
    if "trials" in s and s["trials"] < n:
        s["stopped_early"] = True
    return {"trials": done, "summary": s}


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None


def parse(argv: list[str] | None = None) -> BenchConfig:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = BenchConfig()
    ap.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated subset of {','.join(FAULTS)} (default: all)",
    )
    ap.add_argument("--trials", type=int, default=d.trials)
    ap.add_argument("--workers", type=int, default=d.workers)
    ap.add_argument(
        "--curve",
        type=_ints,
        default=(),
        metavar="N,N,...",
        help="also run the kill at each of these worker counts",
    )
    ap.add_argument(
        "--curve-trials",
        type=int,
        default=d.curve_trials,
        help=f"trials per worker count of the curve (default {d.curve_trials})",
    )
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--fault-step", type=int, default=d.fault_step)
    ap.add_argument(
        "--step-time", type=float, default=d.step_time, help="seconds of simulated compute per step"
    )
    ap.add_argument(
        "--give-up",
        type=float,
        default=d.give_up,
        help="a fault with no step within this many seconds is not recovered",
    )
    ap.add_argument(
        "--job-timeout",
        type=float,
        default=d.job_timeout,
        help="seconds a job may take to finish after its fault",
    )
    ap.add_argument(
        "--stop-after",
        type=int,
        default=d.stop_after,
        metavar="K",
        help="stop a side's trials of a fault after K unrecovered in a row (0: never; default 2)",
    )
    ap.add_argument("--no-torchrun", action="store_true", help="only this runtime")
    ap.add_argument(
        "--torchrun-default-gloo",
        action="store_true",
        help="torchrun without TORCH_GLOO_LAZY_INIT=1 (it rarely recovers then)",
    )
    ap.add_argument("--out", default=d.out, help="folder for failures.json and failures.md")
    args = ap.parse_args(argv)
    try:
        return BenchConfig(
            faults=tuple(f.strip() for f in args.faults.split(",") if f.strip()),
            trials=args.trials,
            workers=args.workers,
            curve=args.curve,
            curve_trials=args.curve_trials,
            steps=args.steps,
            fault_step=args.fault_step,
            step_time=args.step_time,
            give_up=args.give_up,
            job_timeout=args.job_timeout,
            stop_after=args.stop_after,
            torchrun=not args.no_torchrun,
            torchrun_lazy=not args.torchrun_default_gloo,
            out=args.out,
        )
    except ValueError as exc:
        ap.error(str(exc))
        raise  # unreachable: ap.error exits


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    os.makedirs(cfg.out, exist_ok=True)
    results = run(cfg)
    table = markdown(cfg, results)
    with open(os.path.join(cfg.out, "failures.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(cfg.out, "failures.md"), "w", encoding="utf-8") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
