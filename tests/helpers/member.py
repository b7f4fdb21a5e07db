"""A member process for subprocess tests: ``python -m tests.helpers.member`` from the repo root.

Joins a job and follows its Worlds, printing one JSON line per event on stdout:
``{"event": "world", ...}`` for each World it holds, ``{"event": "lost", ...}``
when it can no longer take part (its session was lost). Commands on stdin:

    fence G S    with generation G, try a fenced transaction (writes probe_key, value
                 "g{G}-s{S}") and a checkpoint commit of step S; replies
                 {"event": "fence", "txn": bool, "commit": bool, "lost": bool}
    arrive G T [B]
                 wait up to T s for every member of World G to reach its group
                 formation (Rendezvous.await_members, hang bound B s); replies
                 {"event": "arrived", "generation": G, "reason": str | None, "took": float}
    exit         leave the job and exit 0
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

from elastic.coord.etcd import EtcdConfig, connect
from elastic.coord.keys import Keyspace
from elastic.coord.rendezvous import RendezvousConfig
from tests.helpers.sim import SimMember

_out_lock = threading.Lock()


def emit(**fields: object) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()


def probe_key(keys: Keyspace, member_id: str) -> str:
    """The key a member's fenced transaction writes (tests look for it)."""
    return f"{keys.root}probe/{member_id}"


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
    cfg = RendezvousConfig(
        min_workers=args.min_workers,
        lease_ttl=args.ttl,
        settle_s=0.2,
        last_call_s=30.0,
        op_timeout=5.0,
    )
    member = SimMember(
        client,
        keys,
        args.id,
        cfg,
        on_world=lambda w: emit(
            event="world",
            id=args.id,
            generation=w.generation,
            ids=list(w.ids),
            rank=w.rank_of(args.id),
        ),
        on_error=lambda exc: emit(
            event="lost",
            id=args.id,
            error=f"{type(exc).__name__}: {exc}",
            reason=member.rdzv.session.lost_reason,
        ),
    ).start()
    if not member.started.wait(30):
        emit(event="error", id=args.id, error=repr(member.error))
        return 1
    # As a worker does: its lease published, so a peer can evict it (revoke it).
    lease = member.rdzv.session.lease_id
    client.put(keys.lease_of(args.id), str(lease), lease=lease)
    emit(event="started", id=args.id, lease=lease)
    rdzv = member.rdzv
    for line in sys.stdin:
        cmd = line.split()
        if cmd[:1] == ["fence"]:
            gen, step = int(cmd[1]), int(cmd[2])
            tx = client.transactions
            txn = rdzv.fenced_txn(gen, [tx.put(probe_key(keys, args.id), f"g{gen}-s{step}")])
            commit = rdzv.commit_fence(gen)(step)
            emit(
                event="fence",
                id=args.id,
                generation=gen,
                step=step,
                txn=txn,
                commit=commit,
                lost=rdzv.session.lost.is_set(),
            )
        elif cmd[:1] == ["arrive"]:
            gen, timeout = int(cmd[1]), float(cmd[2])
            bound = float(cmd[3]) if len(cmd) > 3 else None
            world = rdzv.current()
            assert world is not None and world.generation == gen, (world, gen)
            t0 = time.monotonic()
            reason = rdzv.await_members(world, timeout, hang_bound_s=bound)
            emit(
                event="arrived",
                id=args.id,
                generation=gen,
                reason=reason,
                took=time.monotonic() - t0,
            )
        elif cmd[:1] == ["exit"]:
            break
    member.leave()
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
