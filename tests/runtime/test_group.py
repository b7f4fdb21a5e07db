"""WorkerGroup: per-generation process groups re-formed inside one process."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from elastic.coord.world import World, WorldMember


def _member(rank: int, store_addr: str | None, queue, fail_first: bool) -> None:
    import torch

    from elastic.base.errors import WorkerGroupError
    from elastic.train.group import StoreHost, WorkerGroup

    host = StoreHost(timeout=10)
    if rank == 0:
        queue.put(host.address)
        store_addr = host.address
    if fail_first:
        # A generation whose peer never comes: init fails and leaves torch's
        # group counter advanced in this process only.
        lonely = World("j", 1, (WorldMember("a", store=host.address), WorldMember("b")))
        try:
            WorkerGroup(lonely, 0, host, timeout=1).form()
            queue.put("unexpected: lonely group formed")
            return
        except WorkerGroupError:
            pass
    world = World("j", 2, (WorldMember("a", store=store_addr), WorldMember("b", store=store_addr)))
    for generation in (2, 3):  # two generations in a row, in the same process
        world = World("j", generation, world.members)
        group = WorkerGroup(world, rank, host, timeout=10).form()
        t = torch.tensor([float(rank + 1)])
        group.all_reduce(t)
        group.close()
        queue.put((rank, generation, t.item()))


def test_ranks_with_different_failure_histories_still_form_the_next_generation():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    a = ctx.Process(target=_member, args=(0, None, queue, True))
    a.start()
    try:
        addr = queue.get(timeout=60)
        b = ctx.Process(target=_member, args=(1, addr, queue, False))
        b.start()
        try:
            results = sorted(queue.get(timeout=60) for _ in range(4))
        finally:
            b.join(timeout=30)
            if b.is_alive():
                b.kill()
    finally:
        a.join(timeout=30)
        if a.is_alive():
            a.kill()
    assert results == [(0, 2, 3.0), (0, 3, 3.0), (1, 2, 3.0), (1, 3, 3.0)]


ABANDONS = 200


def _abandoner(rank: int, store_addr: str | None, queue, cycles: int) -> None:
    import datetime
    import os
    import threading
    import time

    import torch
    import torch.distributed as dist

    from elastic.base.errors import WorkerGroupError
    from elastic.train.group import StoreHost, WorkerGroup, graveyard

    def usage() -> tuple[int, int]:
        return threading.active_count(), len(os.listdir("/proc/self/fd"))

    host = StoreHost(timeout=10)
    if rank == 0:
        queue.put(host.address)
        store_addr = host.address
        sync = host.store
    else:
        addr, _, port = store_addr.rpartition(":")
        sync = dist.TCPStore(
            addr,
            int(port),
            is_master=False,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=60),
        )

    def barrier(name: str) -> None:
        sync.set(f"{name}/{rank}", "1")
        sync.wait([f"{name}/{1 - rank}"])

    members = (WorldMember("a", store=store_addr), WorldMember("b", store=store_addr))
    kept = []  # rank 1 plays a frozen peer: its groups stay open, it never joins in
    baseline = None
    most_parked = 0
    barrier("start")  # the peer is up: a 1 s group timeout is enough from here on
    for generation in range(1, cycles + 1):
        group = WorkerGroup(World("j", generation, members), rank, host, timeout=1.0).form()
        if generation == 1:
            group.all_reduce(torch.ones(1))  # transports set up before the baseline
            baseline = usage()
        if rank == 1:
            kept.append(dist.distributed_c10d._get_default_group())
        else:
            try:
                group.all_reduce(torch.ones(1024), watch=lambda waited: "test abandon")
                queue.put("unexpected: the collective completed")
                return
            except WorkerGroupError as exc:
                assert "abandoned" in str(exc), exc
            most_parked = max(most_parked, len(graveyard))
        group.close()
        barrier(f"gen{generation}")
    if rank == 0:
        # Every abandoned collective fails at its 1 s timeout; the graveyard
        # then releases its group: nothing stays behind.
        deadline = time.monotonic() + 30
        while graveyard.reap() and time.monotonic() < deadline:
            time.sleep(0.1)
    barrier("reaped")
    # The frozen peer's open groups hold store connections that rank 0's
    # store server accepted: once it lets go (dies, or rejoins), rank 0 must
    # be back where it started.
    kept.clear()
    barrier("released")
    if rank == 0:
        deadline = time.monotonic() + 30
        while usage()[1] > baseline[1] + 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        queue.put(("rank0", most_parked, len(graveyard), baseline, usage()))
    barrier("end")


@pytest.mark.slow  # CI time (19 s)
def test_abandoned_collectives_leave_bounded_threads_and_sockets():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    a = ctx.Process(target=_abandoner, args=(0, None, queue, ABANDONS))
    a.start()
    b = None
    try:
        addr = queue.get(timeout=60)
        b = ctx.Process(target=_abandoner, args=(1, addr, queue, ABANDONS))
        b.start()
        result = queue.get(timeout=240)
    finally:
        for p in (a, b):
            if p is not None:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    assert not isinstance(result, str), result
    _, most_parked, parked_at_end, baseline, final = result
    assert parked_at_end == 0
    assert most_parked > 0  # closing did not wait for the pending collectives
    # Parked groups are released as their collectives time out: far fewer
    # than the 200 abandons are ever alive at once.
    assert most_parked < ABANDONS / 2, most_parked
    threads0, fds0 = baseline
    threads1, fds1 = final
    assert threads1 <= threads0 + 2, (baseline, final)
    assert fds1 <= fds0 + 4, (baseline, final)
