"""Rendezvous benchmark: N simulated members join one job on a real etcd.

Reports, for each N, the seconds from the start signal until every member
holds the same World, and the etcd requests per member over that time.

Members are threads in worker processes: each process runs ``--per-client``
members (default 16) that share one etcd client (one gRPC channel), as a host
with several local workers would. Processes are started and connected before
the clock starts; they begin joining on one signal.

    python benchmarks/rendezvous.py                       # 64 and 256 members, embedded etcd
    python benchmarks/rendezvous.py -n 16 64 256 --repeat 5 --etcd http://host:2379
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from elastic.coord.etcd import EmbeddedEtcd, EtcdConfig, connect
from elastic.coord.keys import Keyspace
from elastic.coord.membership import Member
from elastic.coord.rendezvous import Rendezvous, RendezvousConfig

# Client methods that each send one request (or open one stream) to etcd.
COUNTED = {
    "put",
    "get",
    "get_response",
    "get_prefix",
    "get_prefix_response",
    "delete",
    "transaction",
    "lease",
    "refresh_lease",
    "revoke_lease",
    "get_lease_info",
    "status",
}
KINDS = ["lease", "put", "transaction", "get_prefix_response", "watch stream", "refresh_lease"]


class CountingClient:
    """Forwards to an etcd client and counts requests by kind.

    ``membership._WatchStream`` opens its gRPC watch stream on ``client.channel``
    directly; each read of ``channel`` through this proxy is one stream creation.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self.enabled = True

    def _count(self, kind: str) -> None:
        if self.enabled:
            with self._lock:
                self.counts[kind] += 1

    @property
    def channel(self) -> Any:
        self._count("watch stream")
        return self._client.channel

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name not in COUNTED:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._count(name)
            return attr(*args, **kwargs)

        return counted


# -- worker process: a group of members sharing one client ---------------------


def worker(args: argparse.Namespace) -> int:
    cfg = RendezvousConfig(
        min_workers=args.members,
        max_workers=args.members,
        settle_s=args.settle,
        lease_ttl=args.ttl,
        op_timeout=30,
        last_call_s=args.timeout,
    )
    client = CountingClient(connect(EtcdConfig.from_url(args.etcd, rpc_timeout=10)))
    keys = Keyspace(args.job)
    rdzvs = [
        Rendezvous(client, keys, Member(f"m{i:04d}"), cfg)
        for i in range(args.first, args.first + args.count)
    ]
    go = threading.Event()
    held: list[tuple[float, int, bytes] | None] = [None] * len(rdzvs)
    errors: list[str] = []

    def member(i: int) -> None:
        go.wait()
        try:
            rdzvs[i].start()
            world = rdzvs[i].next_world(0, timeout=args.timeout)
            held[i] = (time.monotonic(), world.generation, world.to_json())
        except Exception as exc:  # reported to the parent, which fails the run
            errors.append(f"{rdzvs[i].id}: {exc!r}")

    threads = [threading.Thread(target=member, args=(i,), daemon=True) for i in range(len(rdzvs))]
    for t in threads:
        t.start()
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    go.set()
    for t in threads:
        t.join(args.timeout + 30)
    client.enabled = False
    worlds = {h[2] for h in held if h is not None}
    print(
        json.dumps(
            {
                "done_at": [h[0] for h in held if h is not None],
                "generations": sorted({h[1] for h in held if h is not None}),
                "worlds": len(worlds),
                "world_size": len(json.loads(next(iter(worlds)))["members"]) if worlds else 0,
                "counts": dict(client.counts),
                "errors": errors,
            }
        ),
        flush=True,
    )
    sys.stdin.readline()  # "exit": leave only once every process has measured
    closers = [threading.Thread(target=r.close, daemon=True) for r in rdzvs]
    for t in closers:
        t.start()
    for t in closers:
        t.join(30)
    client._client.close()
    return 0


# -- parent: start workers, give the signal, collect ----------------------------


@dataclass
class Result:
    n: int
    procs: int
    seconds: float
    generations: list[int]
    counts: collections.Counter[str]

    @property
    def per_member(self) -> float:
        return sum(self.counts.values()) / self.n


def run_once(
    url: str, n: int, per_client: int, settle_s: float, ttl: float, timeout: float
) -> Result:
    job = f"bench-{n}-{uuid.uuid4().hex[:8]}"
    starts = range(0, n, per_client)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--worker",
                "--etcd",
                url,
                "--job",
                job,
                "--members",
                str(n),
                "--first",
                str(first),
                "--count",
                str(min(per_client, n - first)),
                "--settle",
                str(settle_s),
                "--ttl",
                str(ttl),
                "--timeout",
                str(timeout),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for first in starts
    ]
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"worker {p.pid} did not start (exit {p.wait(10)})")
        started = time.monotonic()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        reports = [json.loads(p.stdout.readline()) for p in procs]
        for p in procs:
            p.stdin.write("exit\n")
            p.stdin.flush()
        for p in procs:
            try:
                p.wait(60)  # members leave concurrently; each close is bounded (~10 s)
            except subprocess.TimeoutExpired:  # measured already; say so and go on
                print(f"warning: worker {p.pid} did not exit within 60 s; killed", file=sys.stderr)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    errors = [e for r in reports for e in r["errors"]]
    if errors:
        raise RuntimeError(f"{len(errors)} member(s) failed, first: {errors[0]}")
    done = [t for r in reports for t in r["done_at"]]
    gens = sorted({g for r in reports for g in r["generations"]})
    if (
        len(done) != n
        or len(gens) != 1
        or any(r["worlds"] != 1 for r in reports)
        or any(r["world_size"] != n for r in reports)
    ):
        raise RuntimeError(f"members do not all hold one World of {n}: {reports!r:.500}")
    counts: collections.Counter[str] = collections.Counter()
    for r in reports:
        counts.update(r["counts"])
    return Result(n, len(procs), max(done) - started, gens, counts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, nargs="+", default=[64, 256], help="members (default 64 256)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per N (default 3)")
    ap.add_argument(
        "--per-client",
        type=int,
        default=16,
        help="members per worker process, sharing one etcd client (default 16)",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=RendezvousConfig.settle_s,
        help="settle window in seconds (default: the RendezvousConfig default)",
    )
    ap.add_argument(
        "--ttl",
        type=float,
        default=RendezvousConfig.lease_ttl,
        help="lease TTL in seconds (default: the RendezvousConfig default)",
    )
    ap.add_argument("--timeout", type=float, default=60.0, help="per-run bound in seconds")
    ap.add_argument("--etcd", default=None, help="etcd URL (default: an embedded etcd)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--members", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    server = None if args.etcd else EmbeddedEtcd().start()
    url = args.etcd or server.url
    try:
        rows = []
        for n in args.n:
            runs = [
                run_once(url, n, args.per_client, args.settle, args.ttl, args.timeout)
                for _ in range(args.repeat)
            ]
            rows.append(runs)
            print(f"N={n}: " + ", ".join(f"{r.seconds:.2f}s" for r in runs), file=sys.stderr)
    finally:
        if server is not None:
            server.stop()

    print(
        f"\nMembers are threads, {args.per_client} per worker process sharing one etcd "
        f"client; min_workers = max_workers = N; settle window {args.settle:.2f}s; lease "
        f"TTL {args.ttl:.0f}s; {args.repeat} run(s) per N; etcd "
        f"{'embedded (same machine)' if server else url}; {os.cpu_count()} CPU(s).\n"
    )
    header = [
        "members",
        "processes",
        "s to common World (median)",
        "s (max)",
        "requests/member",
        *[f"{k}/member" for k in KINDS],
        "other/member",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for runs in rows:
        med = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
        other = sum(v for k, v in med.counts.items() if k not in KINDS) / med.n
        cells = [
            str(med.n),
            str(med.procs),
            f"{med.seconds:.2f}",
            f"{max(r.seconds for r in runs):.2f}",
            f"{statistics.median(r.per_member for r in runs):.2f}",
            *[f"{med.counts[k] / med.n:.2f}" for k in KINDS],
            f"{other:.2f}",
        ]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
