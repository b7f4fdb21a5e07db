"""The pause survivors see when a worker joins: live join vs the World waiting.

    python benchmarks/join.py [--sizes 300e6,1e9] [--trials 5] [--out bench-out/join]

Per trial: ``elastic run -n 2 examples/own_loop.py`` (an MLP of width 2048 and
as many layers as the state size asks, AdamW: parameters + two moments, ~12
bytes a parameter), and once it completed step 4 a second launcher adds one
worker. Measured from rank 0's step events: the gap between the last step
before the join and the first step of the World with the joiner, minus the
median step interval (the pause: what the join cost the survivors beyond a
step), and from the joiner's ``joined`` event the bytes, peers and seconds of
its transfer. Side by side, trial by trial: the live join (default) and
``--pause-joins`` (the World waits for the transfer, as before).
Goal (the state-transfer issue): pause <= 0.5 s at 300 MB and 1 GB (median).
Writes results.json and results.md to --out, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from recovery import Group, elastic_run, wait_for  # noqa: E402

from elastic.base.events import Event, read_events  # noqa: E402
from elastic.coord.etcd import EmbeddedEtcd  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(HERE), "examples", "own_loop.py")
WIDTH = 2048


def depth_for(state_bytes: float) -> int:
    return max(1, round(state_bytes / 12 / (WIDTH * WIDTH + WIDTH)))


def cmd(job: str, etcd: str, log: str, n: int, depth: int, pause: bool) -> list[str]:
    return [
        *elastic_run(
            job, etcd, log, n, "--join-timeout", "300", *(["--pause-joins"] if pause else [])
        ),
        SCRIPT,
        "--width",
        str(WIDTH),
        "--depth",
        str(depth),
        "--steps",
        "1000",
        "--num-workers",
        "0",
        "--eval-every",
        "100000",
        "--exact",
    ]


def trial(tmp: str, etcd: str, depth: int, pause: bool, give_up: float) -> dict:
    job = f"bjn{uuid.uuid4().hex[:6]}"
    log = os.path.join(tmp, f"{job}.jsonl")
    g = Group()

    def events() -> list[dict]:
        return read_events(log, missing_ok=True)

    def steps() -> list[dict]:
        return [e for e in events() if e["event"] == Event.STEP]

    try:
        g.start(cmd(job, etcd, log, 2, depth, pause), dict(os.environ), log + ".out")
        if not wait_for(lambda: [e for e in steps() if e["step"] >= 4], give_up, poll=0.1):
            return {"joined": False, "error": "never reached step 4"}
        g.start(cmd(job, etcd, log, 1, depth, pause), dict(os.environ), log + ".join.out")
        grown = wait_for(lambda: [e for e in steps() if e["world"] == 3], give_up, poll=0.1)
        if not grown:
            tails = ""
            for path in (log + ".out", log + ".join.out"):
                with open(path, errors="replace") as f:
                    tails += f"--- {os.path.basename(path)}\n" + f.read()[-3000:]
            return {"joined": False, "error": "no step with the joiner", "logs": tails}
        # Two more steps: the interval after the join counts in the median too.
        wait_for(lambda: [e for e in steps() if e["step"] >= grown[0]["step"] + 2], give_up, 0.1)
        evs = steps()
        first = min((e for e in evs if e["world"] == 3), key=lambda e: e["t"])
        prev = max((e for e in evs if e["t"] < first["t"]), key=lambda e: e["t"])
        intervals = [
            b["t"] - a["t"]
            for a, b in zip(evs, evs[1:], strict=False)
            if a["gen"] == b["gen"] and b["step"] == a["step"] + 1
        ]
        usual = statistics.median(intervals)
        gap = first["t"] - prev["t"]
        gen = [e for e in events() if e["event"] == Event.GENERATION and len(e["world"]) == 3]
        joined = [e for e in events() if e["event"] == Event.JOINED]
        out = {
            "joined": True,
            "gap": gap,
            "usual": usual,
            "pause": max(0.0, gap - usual),
            "live": bool(gen and gen[0].get("live")),
        }
        if joined:
            out.update(bytes=joined[0]["bytes"], seconds=joined[0]["seconds"])
            out["peers"] = joined[0]["peers"]
        elif gen:
            out.update(bytes=gen[0]["sync_bytes"], seconds=gen[0]["sync_s"], peers=1)
        return out
    finally:
        g.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="300e6,1e9", help="state sizes in bytes, comma-separated")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--give-up", type=float, default=300.0, help="seconds a wait may take")
    p.add_argument("--out", default="bench-out/join")
    args = p.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, dict[str, list[dict]]] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedEtcd(data_dir=os.path.join(tmp, "etcd")) as etcd,
    ):
        for size in sizes:
            depth = depth_for(size)
            key = f"{size / 1e6:.0f} MB"
            results[key] = {"live": [], "pause": []}
            for i in range(args.trials):
                for mode in ("live", "pause"):
                    r = trial(tmp, etcd.url, depth, mode == "pause", args.give_up)
                    r["depth"] = depth
                    results[key][mode].append(r)
                    print(f"{key} {mode} trial {i}: {json.dumps(r)}", flush=True)
    rows = [
        "| state | mode | survivors' pause (median) | pauses | transfer | peers |",
        "|---|---|---|---|---|---|",
    ]
    for key, modes in results.items():
        for mode, runs in modes.items():
            ok = [r for r in runs if r.get("joined")]
            if not ok:
                rows.append(f"| {key} | {mode} | no join | | | |")
                continue
            pauses = [r["pause"] for r in ok]
            mb = statistics.median(r.get("bytes", 0) for r in ok) / 1e6
            secs = statistics.median(r.get("seconds", 0.0) for r in ok)
            rate = mb / secs if secs else 0.0
            rows.append(
                f"| {key} | {mode} | **{statistics.median(pauses):.3f} s** | "
                f"{', '.join(f'{x:.2f}' for x in pauses)} | {mb:.0f} MB in {secs:.2f} s "
                f"({rate:.0f} MB/s) | {ok[0].get('peers')} |"
            )
    table = "\n".join(rows)
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "at": time.time()}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
