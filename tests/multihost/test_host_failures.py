"""Hosts fail as real ones do: a cable pulled, a machine gone, the etcd leader lost.

Three hosts (network namespaces on a bridge), one launcher with one worker on
each, a shared checkpoint directory. Whatever happens to one host, the others
go on and the job ends with the one-host result, every sample once; the side
of a partition that lost etcd trains no step and commits nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from elastic.train.ledger import check_ledger
from tests.helpers.wait import wait_until
from tests.runtime.harness import Job, max_abs_diff

from .bed import LINEAR, HostLauncher, host_env

TOLERANCE = 1e-5
STEPS = 60
BATCH = 32
TRAIN = ["--max-steps", str(STEPS), "--epochs", "1", "--step-time", "0.1"]


@pytest.fixture(scope="module")
def slow_reference(tmp_path_factory: pytest.TempPathFactory):
    job = Job(tmp_path_factory.mktemp("mh-failures-ref"), nproc=2, script=LINEAR, script_args=TRAIN)
    try:
        assert job.wait(180) == 0, job.log_tail()
        yield job.out
    finally:
        job.close()


def _start(bed, tmp_path, job_id: str, etcd: str) -> list[HostLauncher]:
    common = [
        "--min-workers",
        "2",
        "--checkpoint",
        f"file://{tmp_path}/ck",
        "--checkpoint-every",
        "10",
        "--ledger-dir",
        str(tmp_path / "ledger"),
    ]
    return [
        HostLauncher(h, str(tmp_path), job=job_id, etcd=etcd, extra=common, train_args=TRAIN)
        for h in bed.hosts
    ]


def _events(launchers: list[HostLauncher]) -> list[dict]:
    return sorted((e for x in launchers for e in x.events()), key=lambda e: e["t"])


def _member_of(launcher: HostLauncher) -> str:
    spawns = [e for e in launcher.events() if e["event"] == "spawn"]
    return spawns[0]["member"]


def _wait(launchers, predicate, timeout: float, what: str):
    try:
        return wait_until(lambda: predicate(_events(launchers)), timeout, what, interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n" + "\n".join(x.log_tail() for x in launchers)) from None


def _step_reached(n: int):
    return lambda evs: [e for e in evs if e["event"] == "step" and e["step"] >= n]


def _world_without(member: str):
    """A World formed without ``member`` after it was in one (the first World
    may form before a slow host's worker registers: that one does not count)."""

    def worlds(evs):
        gens = [e for e in evs if e["event"] == "generation"]
        joined = [e["gen"] for e in gens if member in e["world"]]
        return [e for e in gens if joined and e["gen"] > joined[0] and member not in e["world"]]

    return worlds


def _running(bed, tmp_path, job_id: str, etcd: str) -> list[HostLauncher]:
    """A launcher on every host of ``bed``, once the job trained 15 steps, the
    last of them with every host's worker."""
    launchers = _start(bed, tmp_path, job_id, etcd)
    everyone = len(launchers)
    _wait(
        launchers,
        lambda evs: [
            e for e in evs if e["event"] == "step" and e["step"] >= 15 and e["world"] == everyone
        ],
        180,
        f"step 15 with all {everyone} hosts",
    )
    return launchers


def _finish_and_check(launchers, tmp_path, reference: str) -> list[dict]:
    for x in launchers:
        assert x.wait(240) == 0, "\n".join(y.log_tail() for y in launchers)
    finals = [x.out for x in launchers if os.path.exists(x.out)]
    assert finals, "no host wrote the final parameters"
    for out in finals:
        diff = max_abs_diff(out, reference)
        assert diff <= TOLERANCE, f"{out} differs from the one-host result by {diff}"
    report = check_ledger(str(tmp_path / "ledger"), 2048, epochs=[0])
    assert report.epochs[0] == STEPS * BATCH and not report.duplicated, report
    events = _events(launchers)
    # One World per generation, whoever reported it: never two Worlds at once.
    worlds: dict[int, tuple] = {}
    for e in events:
        if e["event"] == "generation":
            assert worlds.setdefault(e["gen"], tuple(e["world"])) == tuple(e["world"]), e
    _assert_steps_once(events)
    return events


def _assert_steps_once(events: list[dict]) -> None:
    """Each step is completed once per generation, and a step two generations report
    was the last of the older one: a rank cut off while its all-reduce finished
    (gloo's ring completes on some ranks before others) reported a step that the
    survivors, who never finished it, redid in the next World. That attempt is
    superseded, as the ledger counts it (the newest generation's attempt)."""
    seen: dict[int, list[int]] = {}
    last: dict[int, int] = {}
    for e in events:
        if e["event"] == "step":
            gens = seen.setdefault(e["step"], [])
            assert e["gen"] not in gens, f"step {e['step']} completed twice in gen {e['gen']}"
            gens.append(e["gen"])
            last[e["gen"]] = max(last.get(e["gen"], 0), e["step"])
    for step, gens in seen.items():
        for g in sorted(gens)[:-1]:
            assert last[g] == step, (
                f"step {step} completed by generation {g} and again by {max(gens)}, "
                f"though generation {g} went on to step {last[g]}"
            )


def _commits(bed, etcd: str, job_id: str) -> list[dict]:
    proc = bed.hosts[0].run(
        [sys.executable, "-m", "tests.multihost.dump", etcd, job_id],
        env=host_env(),
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        stdout=-1,
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return json.loads(out)["commits"]


def test_link_down_host_is_left_behind_trains_nothing_and_rejoins(
    make_bed, tmp_path, job_id, slow_reference
):
    bed = make_bed(3)
    etcd = bed.etcd_single(str(tmp_path / "etcd"))  # on host 0: host 2 is the minority
    launchers = _running(bed, tmp_path, job_id, etcd)
    cut = launchers[2]
    victim = _member_of(cut)
    t_down = time.time()
    bed.hosts[2].link_down()
    try:
        gone = _wait(launchers, _world_without(victim), 60, "a World without the cut-off host")
        partition_gen = gone[0]["gen"]
        # Ten steps on, and a checkpoint committed without the cut-off host
        # (an async save commits a step or so after it starts).
        _wait(
            launchers,
            lambda evs: (
                _step_reached(gone[0]["step"] + 10)(evs)
                and [
                    e
                    for e in evs
                    if e["event"] == "checkpoint_committed" and e["step"] > gone[0]["step"]
                ]
            ),
            120,
            "ten steps and a commit without it",
        )
    finally:
        t_up = time.time()
        bed.hosts[2].link_up()
    events = _finish_and_check(launchers, tmp_path, slow_reference)
    # The cut-off side trained no step of the Worlds formed without it...
    with open(tmp_path / "ledger" / f"ledger-{victim}.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    gens_without = {
        e["gen"] for e in events if e["event"] == "generation" and victim not in e["world"]
    }
    assert not [r for r in records if r["gen"] in gens_without]
    assert partition_gen in gens_without
    # ...and committed nothing while it was cut off.
    during = [c for c in _commits(bed, etcd, job_id) if t_down <= c["at"] <= t_up]
    assert during, "no checkpoint was committed during the partition"
    assert not [c for c in during if c["by"] == victim], during


@pytest.mark.slow
def test_lost_host_costs_one_reform_and_the_result_stays_exact(
    make_bed, tmp_path, job_id, slow_reference
):
    bed = make_bed(3)
    etcd = bed.etcd_single(str(tmp_path / "etcd"))
    launchers = _running(bed, tmp_path, job_id, etcd)
    victim = _member_of(launchers[2])
    bed.hosts[2].kill_all()  # launcher and worker: nobody revokes the lease
    _wait(
        launchers,
        _world_without(victim),
        60,
        "a World without the host",
    )
    survivors = launchers[:2]
    _finish_and_check(survivors, tmp_path, slow_reference)


@pytest.mark.slow
def test_etcd_leader_killed_and_restarted_mid_run_redoes_no_step(
    make_bed, tmp_path, job_id, slow_reference
):
    bed = make_bed(3)
    etcd, servers = bed.etcd_cluster(str(tmp_path / "etcd"))
    launchers = _running(bed, tmp_path, job_id, etcd)
    leader = bed.etcd_leader(etcd)
    servers[leader].kill()
    servers[leader].wait(timeout=30)
    # The killed member comes back on its data dir and catches up, while
    # training goes on through the other two.
    _wait(launchers, _step_reached(30), 120, "step 30 on two etcd members")
    bed.restart_etcd_member(leader)
    bed.wait_healthy(etcd.split(","), 60)
    _finish_and_check(launchers, tmp_path, slow_reference)
    for x in launchers:
        assert [e for e in x.events() if e["event"] == "done"], x.log_tail()


@pytest.mark.slow
def test_partitioned_host_with_an_etcd_member_leaves_the_quorum_to_the_others(
    make_bed, tmp_path, job_id, slow_reference
):
    # Host 2 runs a worker and one of three etcd members: cut off, its member
    # loses the quorum and its worker its session; the other two go on.
    bed = make_bed(3)
    etcd, _servers = bed.etcd_cluster(str(tmp_path / "etcd"))
    launchers = _running(bed, tmp_path, job_id, etcd)
    victim = _member_of(launchers[2])
    bed.hosts[2].link_down()
    try:
        gone = _wait(launchers, _world_without(victim), 60, "a World without the cut-off host")
        _wait(launchers, _step_reached(gone[0]["step"] + 10), 120, "ten steps without it")
    finally:
        bed.hosts[2].link_up()
    _finish_and_check(launchers, tmp_path, slow_reference)
