"""A member process for subprocess tests.

Joins a job and follows its Worlds, printing one JSON line per event on stdout:
``{"event": "world", ...}`` for each World it holds, ``{"event": "lost", ...}``
when its session is lost. Commands on stdin, one per line:

    fence G      try a fenced transaction and a checkpoint commit with generation G;
                 replies {"event": "fence", "txn": bool, "commit": bool, ...}
    exit         leave the job and exit 0

Usage: python member.py --etcd URL --job JOB --id ID [--ttl S] [--min-workers N]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading

from elastic.errors import ElasticError
from elastic.etcd import EtcdConfig, connect
from elastic.keys import Keyspace
from elastic.membership import Member
from elastic.rendezvous import Rendezvous, RendezvousConfig

FENCE_STEP = 7
_out_lock = threading.Lock()


def emit(**fields: object) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()


def probe_key(keys: Keyspace, member_id: str) -> str:
    """The key a member's fenced transaction writes (tests look for it)."""
    return f"{keys.root}probe/{member_id}"


def follow(rdzv: Rendezvous, stop: threading.Event) -> None:
    keys, after = rdzv.keys, 0
    try:
        while not stop.is_set():
            world = rdzv.next_world(after, timeout=60.0)
            emit(event="world", id=rdzv.id, generation=world.generation, ids=list(world.ids),
                 rank=world.rank_of(rdzv.id))
            after = world.generation

            def pending(snap: dict, g: int = after) -> bool | None:
                vals = [int(snap[k].value) for k in (keys.round, keys.gen) if k in snap]
                return True if max(vals, default=0) > g else None

            while not stop.is_set() and not rdzv.session.lost.is_set():
                if rdzv.ctl.wait_for(pending, timeout=1.0, wake=rdzv.session.lost):
                    break
            rdzv.session.check()
    except ElasticError as exc:
        if not stop.is_set():
            emit(event="lost", id=rdzv.id, error=f"{type(exc).__name__}: {exc}",
                 reason=rdzv.session.lost_reason)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--etcd", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--id", required=True)
    ap.add_argument("--ttl", type=float, default=2.0)
    ap.add_argument("--min-workers", type=int, default=1)
    args = ap.parse_args()

    keys = Keyspace(args.job)
    client = connect(EtcdConfig.from_url(args.etcd, rpc_timeout=3.0, connect_timeout=10.0))
    cfg = RendezvousConfig(min_workers=args.min_workers, lease_ttl=args.ttl, settle_s=0.2,
                           last_call_s=30.0, op_timeout=5.0)
    rdzv = Rendezvous(client, keys, Member(args.id, address=f"proc-{args.id}"), cfg).start()
    stop = threading.Event()
    follower = threading.Thread(target=follow, args=(rdzv, stop), daemon=True)
    follower.start()
    emit(event="started", id=args.id, lease=rdzv.session.lease_id)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "fence":
            gen = int(cmd[1])
            tx = client.transactions
            txn = rdzv.fenced_txn(gen, [tx.put(probe_key(keys, args.id), f"gen {gen}")])
            commit = rdzv.commit_fence(gen)(FENCE_STEP)
            emit(event="fence", id=args.id, generation=gen, txn=txn, commit=commit,
                 lost=rdzv.session.lost.is_set())
        elif cmd[0] == "exit":
            break
    stop.set()
    rdzv.close()
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
