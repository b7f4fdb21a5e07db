"""Recovery, join pause and steady-state step time: this runtime vs torchrun.

    python benchmarks/recovery.py [--trials 5] [--quick] [--json out.json]

One invocation, same machine, same model, same global batch and step time
(benchmarks/bench_workload.py). Cases, each repeated --trials times (median
reported):

  elastic kill   : `elastic run -n 3`; SIGKILL one worker at step 30; seconds
                   from the kill to the next completed step; steps redone.
  elastic join   : `elastic run -n 3`; a 4th worker joins at step 30; the
                   extra pause survivors see (gap between steps across the
                   generation change minus the usual step interval).
  torchrun kill  : `torch.distributed.run --rdzv-backend c10d --max-restarts 3`
                   with the script checkpointing every 20 steps and resuming
                   from it; default settings and with TORCH_GLOO_LAZY_INIT=1.
                   A trial that shows no step within --give-up seconds of the
                   kill counts as not recovered.
  steady state   : median step interval over steps 20-120 with no failures,
                   3 workers, no sleep (pure compute), vs plain DDP under
                   torchrun.
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
from collections import Counter
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from elastic.base.events import Event, read_events  # noqa: E402
from elastic.base.procutil import (  # noqa: E402
    descendants,
    dying_with_parent,
    environ_has,
    kill_all,
)
from elastic.coord.etcd import EmbeddedEtcd, free_port  # noqa: E402

WORKLOAD = os.path.join(HERE, "bench_workload.py")


def wait_for(fn: Callable[[], Any], timeout: float, poll: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(poll)  # polling a log file; bounded by timeout
    return None


class Group:
    """Processes started by one trial; all are killed in ``close``."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.extra: set[int] = set()

    def start(self, args: list[str], env: dict[str, str], log: str) -> subprocess.Popen:
        with open(log, "ab") as f:
            # Dies with this process even when it is killed outright.
            p = subprocess.Popen(
                dying_with_parent(args), env=env, stdout=f, stderr=f, start_new_session=True
            )
        self.procs.append(p)
        return p

    def close(self) -> None:
        pids = set(self.extra)
        for p in self.procs:
            pids |= descendants(p.pid) | {p.pid}
        kill_all(pids)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass


def elastic_run(job: str, etcd: str, events: str, n: int, *options: str) -> list[str]:
    """``elastic run -n N`` of job ``job`` on ``etcd``, events to ``events``; the
    script and its arguments follow."""
    return [
        sys.executable,
        "-m",
        "elastic.cli",
        "run",
        "-n",
        str(n),
        "--job",
        job,
        "--etcd",
        etcd,
        "--event-log",
        events,
        *options,
    ]


def elastic_cmd(
    job: str,
    etcd: str,
    events: str,
    n: int,
    steps: int,
    step_time: float,
    extra: list[str] | None = None,
    script_args: list[str] | None = None,
) -> list[str]:
    return [
        *elastic_run(job, etcd, events, n, *(extra or [])),
        WORKLOAD,
        "elastic",
        "--steps",
        str(steps),
        "--step-time",
        str(step_time),
        *(script_args or []),
    ]


def new_job(tmp: str, prefix: str) -> tuple[str, str]:
    """A fresh job id starting with ``prefix`` and its event log under ``tmp``."""
    job = f"{prefix}{uuid.uuid4().hex[:6]}"
    return job, os.path.join(tmp, f"{job}.jsonl")


def reached(log: str, step: int, world: int | None = None, timeout: float = 180.0) -> bool:
    """Whether the job logging to ``log`` completes step ``step`` (in a World of
    ``world`` workers, when given) within ``timeout`` seconds."""
    return bool(
        wait_for(
            lambda: any(
                e["step"] >= step and (world is None or e["world"] == world)
                for e in steps_of(read_events(log, missing_ok=True))
            ),
            timeout,
        )
    )


def steps_of(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("event") == Event.STEP]


def steps_redone(events: list[dict]) -> int:
    """How many step numbers were completed more than once (across generations
    or torchrun attempts): work a failure threw away."""
    seen = Counter(e["step"] for e in steps_of(events))
    return sum(1 for n in seen.values() if n > 1)


def trial_elastic_kill(tmp: str, etcd: str, step_time: float, give_up: float) -> dict:
    job, log = new_job(tmp, "bk")
    g = Group()
    try:
        g.start(
            elastic_cmd(job, etcd, log, 3, 2000, step_time, ["--max-restarts", "0"]),
            dict(os.environ),
            os.path.join(tmp, f"{job}.out"),
        )
        if not reached(log, 30):
            return {"recovered": False, "error": "never reached step 30"}
        evs = read_events(log, missing_ok=True)
        gen_event = [e for e in evs if e["event"] == Event.GENERATION][-1]
        victim = gen_event["world"][1]
        pid = [e for e in evs if e["event"] == Event.SPAWN and e["member"] == victim][-1]["pid"]
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        after = wait_for(
            lambda: [
                e
                for e in steps_of(read_events(log, missing_ok=True))
                if e["gen"] > gen_event["gen"]
            ],
            give_up,
        )
        if not after:
            return {"recovered": False}
        before = max(
            e["step"] for e in steps_of(read_events(log, missing_ok=True)) if e["t"] <= t_kill
        )
        return {
            "recovered": True,
            "seconds": after[0]["t"] - t_kill,
            "redone": before - (after[0]["step"] - 1),
        }
    finally:
        g.close()


def trial_elastic_join(tmp: str, etcd: str, step_time: float, give_up: float) -> dict:
    job, log = new_job(tmp, "bj")
    g = Group()
    try:
        g.start(
            elastic_cmd(job, etcd, log, 3, 2000, step_time),
            dict(os.environ),
            os.path.join(tmp, f"{job}.out"),
        )
        if not reached(log, 30):
            return {"joined": False, "error": "never reached step 30"}
        g.start(
            elastic_cmd(job, etcd, log, 1, 2000, step_time),
            dict(os.environ),
            os.path.join(tmp, f"{job}.join.out"),
        )
        grown = wait_for(
            lambda: [e for e in steps_of(read_events(log, missing_ok=True)) if e["world"] == 4],
            give_up + 30,
        )
        if not grown:
            return {"joined": False}
        steps = steps_of(read_events(log, missing_ok=True))
        first = grown[0]
        prev = max((e for e in steps if e["step"] == first["step"] - 1), key=lambda e: e["t"])
        intervals = [
            b["t"] - a["t"]
            for a, b in zip(steps, steps[1:], strict=False)
            if a["gen"] == b["gen"] and b["step"] == a["step"] + 1
        ]
        usual = statistics.median(intervals)
        gap = first["t"] - prev["t"]
        return {"joined": True, "gap": gap, "usual": usual, "pause": max(0.0, gap - usual)}
    finally:
        g.close()


def torchrun_cmd(
    job: str,
    port: int,
    steps: int,
    step_time: float,
    ckpt: str | None,
    n: int = 3,
    nnodes: str = "1",
    script_args: list[str] | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        nnodes,
        "--nproc-per-node",
        str(n),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        job,
        "--max-restarts",
        "3",
        *(extra or []),
        WORKLOAD,
        "ddp",
        "--steps",
        str(steps),
        "--step-time",
        str(step_time),
        *(script_args or []),
    ]
    if ckpt:
        cmd += ["--ckpt", ckpt, "--ckpt-every", "20"]
    return cmd


def workers_of(agent: subprocess.Popen, log: str, local_rank: int) -> list[int]:
    """Pids of ``agent``'s training processes of ``local_rank`` in the job logging to ``log``."""
    return [
        p
        for p in descendants(agent.pid)
        if environ_has(p, f"LOCAL_RANK={local_rank}".encode())
        and environ_has(p, f"BENCH_EVENTS={log}".encode())
    ]


# Injects a fault into a running torchrun job (its agents, its step log): the
# time of the fault, or why it could not be injected.
TorchrunFault = Callable[[list[subprocess.Popen], str], "float | str"]


def signal_local_rank(sig: int, local_rank: int = 1) -> TorchrunFault:
    """A fault: ``sig`` to ``local_rank`` of the first agent."""

    def fault(agents: list[subprocess.Popen], log: str) -> float | str:
        victims = workers_of(agents[0], log, local_rank)
        if not victims:
            return f"worker of local rank {local_rank} not found"
        t = time.time()
        for pid in victims:
            os.kill(pid, sig)
        return t

    return fault


def trial_torchrun(
    tmp: str,
    step_time: float,
    give_up: float,
    lazy: bool,
    *,
    fault: TorchrunFault | None = None,
    agents: int = 1,
    nproc: int = 3,
    at_step: int = 30,
    script_args: list[str] | None = None,
) -> dict:
    """torchrun (``agents`` agents of ``nproc`` workers, one rendezvous) under
    ``fault`` (default: SIGKILL of local rank 1) at step ``at_step``: seconds
    from the fault to the first step of a restarted attempt, steps redone."""
    fault = fault or signal_local_rank(signal.SIGKILL)
    job, log = new_job(tmp, "tk")
    env = dict(os.environ, BENCH_EVENTS=log)
    if lazy:
        env["TORCH_GLOO_LAZY_INIT"] = "1"
    port = free_port()
    nnodes = "1" if agents == 1 else f"1:{agents}"

    def rdzv_host(i: int) -> list[str]:
        # Every agent here matches the endpoint's host name, so each would try
        # to host the rendezvous store and the fastest would: on real machines
        # only the endpoint's does. Say so, so the lost "host" is never it.
        return [] if agents == 1 else ["--rdzv-conf", f"is_host={int(i == 0)}"]

    g = Group()
    try:
        started = [
            g.start(
                torchrun_cmd(
                    job,
                    port,
                    2000,
                    step_time,
                    os.path.join(tmp, f"{job}.pt"),
                    n=nproc,
                    nnodes=nnodes,
                    script_args=script_args,
                    extra=rdzv_host(i),
                ),
                env,
                os.path.join(tmp, f"{job}.{i}.out"),
            )
            for i in range(agents)
        ]
        world = agents * nproc
        if not reached(log, at_step, world):
            return {"recovered": False, "error": f"never reached step {at_step}"}
        t_fault = fault(started, log)
        if isinstance(t_fault, str):
            return {"recovered": False, "error": t_fault}
        after = wait_for(
            lambda: [e for e in steps_of(read_events(log, missing_ok=True)) if e["attempt"] >= 1],
            give_up,
        )
        if not after:
            return {"recovered": False}
        before = last_step_before(read_events(log, missing_ok=True), t_fault) or 0
        # Redone steps are counted once the restarted attempt got past the fault.
        wait_for(
            lambda: any(
                e["attempt"] >= 1 and e["step"] > before
                for e in steps_of(read_events(log, missing_ok=True))
            ),
            give_up,
        )
        return {
            "recovered": True,
            "seconds": after[0]["t"] - t_fault,
            "redone": steps_redone(read_events(log, missing_ok=True)),
            "fault_at_step": before,
        }
    finally:
        g.close()


def last_step_before(events: list[dict], t: float) -> int | None:
    done = [e["step"] for e in steps_of(events) if e["t"] <= t]
    return max(done) if done else None


def trial_torchrun_kill(tmp: str, step_time: float, give_up: float, lazy: bool) -> dict:
    return trial_torchrun(tmp, step_time, give_up, lazy)


def steady_interval(log: str) -> float | None:
    steps = [e for e in steps_of(read_events(log, missing_ok=True)) if 20 <= e["step"] <= 120]
    intervals = [
        b["t"] - a["t"]
        for a, b in zip(steps, steps[1:], strict=False)
        if b["step"] == a["step"] + 1
    ]
    return statistics.median(intervals) if intervals else None


def trial_steady(tmp: str, etcd: str, hidden: int) -> dict:
    out: dict[str, float | None] = {}
    job, log = new_job(tmp, "bs")
    g = Group()
    try:
        cmd = elastic_cmd(job, etcd, log, 3, 121, 0.0) + ["--hidden", str(hidden)]
        p = g.start(cmd, dict(os.environ), os.path.join(tmp, f"{job}.out"))
        p.wait(timeout=300)
        out["elastic"] = steady_interval(log)
    finally:
        g.close()
    job, log = new_job(tmp, "ts")
    g = Group()
    try:
        cmd = torchrun_cmd(job, free_port(), 121, 0.0, None) + ["--hidden", str(hidden)]
        env = dict(os.environ, BENCH_EVENTS=log, TORCH_GLOO_LAZY_INIT="1")
        p = g.start(cmd, env, os.path.join(tmp, f"{job}.out"))
        p.wait(timeout=300)
        out["ddp"] = steady_interval(log)
    finally:
        g.close()
    return out


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(x: float | None, unit: str = "s") -> str:
    return "n/a" if x is None else f"{x:.3f} {unit}".strip()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="1 trial each, for a smoke check")
    ap.add_argument(
        "--step-time",
        type=float,
        default=0.05,
        help="seconds of simulated compute per step in the failure cases",
    )
    ap.add_argument("--hidden", type=int, default=512, help="MLP width for the steady case")
    ap.add_argument(
        "--give-up",
        type=float,
        default=30.0,
        help="a kill with no step within this many seconds is not recovered",
    )
    ap.add_argument("--json", default=None, help="write raw results here")
    args = ap.parse_args()
    trials = 1 if args.quick else args.trials
    if trials < 1:
        ap.error("--trials must be >= 1")
    results: dict[str, list[dict]] = {
        k: []
        for k in ("elastic_kill", "elastic_join", "torchrun_default", "torchrun_lazy", "steady")
    }
    with (
        tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp,
        EmbeddedEtcd(data_dir=os.path.join(tmp, "etcd")) as etcd,
    ):
        for i in range(trials):
            # Interleaved so drift of the machine affects every case alike.
            for name, fn in (
                (
                    "elastic_kill",
                    lambda: trial_elastic_kill(tmp, etcd.url, args.step_time, args.give_up),
                ),
                (
                    "elastic_join",
                    lambda: trial_elastic_join(tmp, etcd.url, args.step_time, args.give_up),
                ),
                (
                    "torchrun_default",
                    lambda: trial_torchrun_kill(tmp, args.step_time, args.give_up, lazy=False),
                ),
                (
                    "torchrun_lazy",
                    lambda: trial_torchrun_kill(tmp, args.step_time, args.give_up, lazy=True),
                ),
                ("steady", lambda: trial_steady(tmp, etcd.url, args.hidden)),
            ):
                r = fn()
                results[name].append(r)
                print(f"trial {i + 1}/{trials} {name}: {r}", file=sys.stderr, flush=True)

    def kill_row(name: str, label: str) -> str:
        rs = results[name]
        ok = [r for r in rs if r.get("recovered")]
        return (
            f"| {label} | {len(ok)}/{len(rs)} | {fmt(med([r['seconds'] for r in ok]))} | "
            f"{fmt(med([r['redone'] for r in ok]), '')} |"
        )

    joins = [r for r in results["elastic_join"] if r.get("joined")]
    steady = [r for r in results["steady"] if r.get("elastic") and r.get("ddp")]
    ratio = med([r["elastic"] / r["ddp"] for r in steady])
    lines = [
        f"Recovery benchmark, {trials} trial(s) per case, 3 workers, step time "
        f"{args.step_time}s simulated compute, median shown.",
        "",
        "| case | recovered | kill -> next step | steps redone |",
        "|---|---|---|---|",
        kill_row("elastic_kill", "elastic (this runtime)"),
        kill_row("torchrun_lazy", "torchrun, TORCH_GLOO_LAZY_INIT=1, ckpt every 20"),
        kill_row("torchrun_default", "torchrun, default settings, ckpt every 20"),
        "",
        "| join of a 4th worker | joined | pause survivors see | gap across the switch |"
        " usual step |",
        "|---|---|---|---|---|",
        f"| elastic | {len(joins)}/{len(results['elastic_join'])} | "
        f"{fmt(med([r['pause'] for r in joins]))} | {fmt(med([r['gap'] for r in joins]))} | "
        f"{fmt(med([r['usual'] for r in joins]))} |",
        "",
        f"| steady state (MLP width {args.hidden}, no failures) | step time | ratio |",
        "|---|---|---|",
        f"| elastic | {fmt(med([r['elastic'] for r in steady]))} | "
        f"{'n/a' if ratio is None else f'{ratio:.3f}'} |",
        f"| DDP under torchrun | {fmt(med([r['ddp'] for r in steady]))} | 1.000 |",
    ]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
