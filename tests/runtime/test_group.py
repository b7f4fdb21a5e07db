"""WorkerGroup: per-generation process groups re-formed inside one process."""

from __future__ import annotations

import multiprocessing as mp

from elastic.world import World, WorldMember


def _member(rank: int, store_addr: str | None, queue, fail_first: bool) -> None:
    import torch

    from elastic.errors import WorkerGroupError
    from elastic.group import StoreHost, WorkerGroup

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
