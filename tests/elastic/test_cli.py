"""The ``elastic`` command as a user runs it: status, etcd, and its errors (subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from elastic.coord.etcd import connect, free_port
from elastic.coord.keys import Keyspace
from elastic.coord.rendezvous import RendezvousConfig
from tests.helpers import procs
from tests.helpers.sim import SimMember
from tests.helpers.wait import wait_until

_SCRIPT = os.path.join(os.path.dirname(sys.executable), "elastic")
ELASTIC = [_SCRIPT] if os.path.exists(_SCRIPT) else [sys.executable, "-m", "elastic.cli"]


class Run:
    """One finished ``elastic`` command: exit code, output and how long it took."""

    def __init__(self, returncode: int, stdout: str, stderr: str, elapsed: float) -> None:
        self.returncode, self.stdout, self.stderr, self.elapsed = (
            returncode,
            stdout,
            stderr,
            elapsed,
        )


def elastic_all(*commands: list[str], timeout: float = 60.0) -> list[Run]:
    """Run ``elastic`` commands side by side (each start imports torch: ~3 s here)."""
    started, runs = time.monotonic(), []
    popens = [
        subprocess.Popen(
            [*ELASTIC, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for args in commands
    ]
    try:
        for p in popens:
            out, err = p.communicate(timeout=max(1.0, started + timeout - time.monotonic()))
            runs.append(Run(p.returncode, out, err, time.monotonic() - started))
    finally:
        for p in popens:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=10)
    return runs


def test_status_json_shows_generation_members_with_ranks_and_lease_ttl(
    etcd_url: str, client: Any, keys: Keyspace
) -> None:
    cfg = RendezvousConfig(min_workers=2, lease_ttl=2, settle_s=0.1)
    members = [SimMember(client, keys, mid, cfg).start() for mid in ("w-b", "w-a")]
    try:
        world = wait_until(
            lambda: all(m.current() for m in members) and members[0].current(), 15, "a World of two"
        )
        assert members[0].rdzv.commit_fence(world.generation)(4)
        done, text = elastic_all(
            ["status", "--job", keys.job, "--etcd", etcd_url, "--json"],
            ["status", "--job", keys.job, "--etcd", etcd_url],
        )
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
    finally:
        for m in members:
            m.leave()

    assert status["job"] == keys.job
    assert status["generation"] == world.generation and status["round"] == world.generation
    assert status["world_size"] == 2 and status["leader"] in world.ids
    assert status["last_commit_step"] == 4
    assert [(m["id"], m["rank"]) for m in status["members"]] == [
        (mid, world.rank_of(mid)) for mid in world.ids
    ]
    for m in status["members"]:
        assert 0 < m["lease_ttl_left"] <= 2  # the granted TTL
        assert m["address"] == f"host-{m['id']}"
    assert text.returncode == 0
    assert f"job {keys.job}: generation {world.generation}" in text.stdout
    assert all(mid in text.stdout for mid in world.ids)


DEAD = f"http://127.0.0.1:{free_port()}"  # nothing listens here
BAD_STATUS = {
    # case: (arguments, fragments the message must contain)
    "unreachable": (
        ["--etcd", DEAD, "--etcd-timeout", "1", "--job", "j"],
        ["failed for 1.0s (bound)", DEAD.removeprefix("http://")],
    ),
    "no-scheme": (["--etcd", "localhost:2379", "--job", "j"], ["malformed URL", "localhost:2379"]),
    "no-port": (
        ["--etcd", "http://localhost", "--job", "j"],
        ["malformed endpoint", "'localhost'"],
    ),
    "bad-job": (["--etcd", DEAD, "--job", "bad/job"], ["invalid job id", "'bad/job'"]),
}


@pytest.fixture(scope="module")
def bad_status_runs() -> dict[str, Run]:
    runs = elastic_all(*(["status", *args] for args, _ in BAD_STATUS.values()))
    return dict(zip(BAD_STATUS, runs, strict=True))


@pytest.mark.parametrize("case", list(BAD_STATUS))
def test_status_fails_clearly_and_within_its_bound(
    case: str, bad_status_runs: dict[str, Run]
) -> None:
    done, fragments = bad_status_runs[case], BAD_STATUS[case][1]
    assert done.returncode == 1
    assert done.stderr.startswith("elastic: error: "), done.stderr
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, (fragment, done.stderr)
    assert done.elapsed < 60.0  # no hang, even with four interpreters starting on two cores
    if case == "unreachable":
        # Beyond starting the interpreter (what the config errors cost: they
        # never touch the network), it waits about its stated 1 s bound.
        start_cost = min(r.elapsed for c, r in bad_status_runs.items() if c != case)
        assert done.elapsed - start_cost < 1.0 + 4.0


def test_run_refuses_min_workers_above_max_workers(tmp_path: Any) -> None:
    script = tmp_path / "train.py"
    script.write_text("pass\n")
    (done,) = elastic_all(["run", "--min-workers", "4", "--max-workers", "2", str(script)])
    assert done.returncode != 0
    assert "min-workers" in done.stderr and "4" in done.stderr and "2" in done.stderr
    assert "Traceback" not in done.stderr


def test_elastic_etcd_serves_and_stops_on_sigint(tmp_path: Any) -> None:
    data_dir = str(tmp_path / "data")
    proc = subprocess.Popen(
        [*ELASTIC, "etcd", "--data-dir", data_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first: list[str] = []
        reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(30)
        assert first and first[0].startswith("etcd listening on http://"), (first, proc.poll())
        url = first[0].split()[3]
        etcd_pids = procs.mentioning(data_dir) - {proc.pid}
        assert len(etcd_pids) == 1  # the etcd server, a child of `elastic etcd`

        client = connect(url)
        try:
            client.put("/cli-test", "served")
            assert client.get("/cli-test")[0] == b"served"
        finally:
            client.close()

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0, proc.stderr.read()
        wait_until(
            lambda: not any(procs.alive(p) for p in etcd_pids),
            5,
            "the etcd server to exit with the command",
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
