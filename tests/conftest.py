"""Shared fixtures: one real etcd per session, unique job ids, clients, member processes.

Everything started here is stopped in fixture teardown, pass or fail; the
``tests/elastic`` suite also checks after each test that nothing it started is
still running, and the session ends with a check for leftover children.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from elastic.coord.etcd import EmbeddedEtcd, EtcdConfig, connect
from elastic.coord.keys import Keyspace
from tests.helpers import procs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_job_seq = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def no_leftover_children(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fail the session if a process started by the tests outlives them (then end it)."""
    before = procs.children()
    yield
    base = str(tmp_path_factory.getbasetemp())
    left = (procs.children() - before) | procs.mentioning(base)
    # multiprocessing's resource tracker / forkserver live for the interpreter.
    left = {p for p in left if "multiprocessing" not in procs.cmdline(p)}
    if left:
        described = {p: procs.cmdline(p) for p in left}
        procs.end(left)
        pytest.fail(f"processes left behind by the test session (now ended): {described}")


def _running_etcd(data_dir: str) -> Iterator[EmbeddedEtcd]:
    # die_with_parent: even a pytest killed outright (CI timeout) takes etcd along.
    server = EmbeddedEtcd(data_dir=data_dir, die_with_parent=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedEtcd]:
    """A real etcd on free ports, shared by the session; stopped even on failure."""
    yield from _running_etcd(str(tmp_path_factory.mktemp("etcd-session")))


@pytest.fixture
def etcd_url(etcd_server: EmbeddedEtcd) -> str:
    return etcd_server.url


@pytest.fixture
def fresh_etcd(tmp_path: Any) -> Iterator[EmbeddedEtcd]:
    """A private etcd for tests that kill, restart or compact it."""
    yield from _running_etcd(str(tmp_path / "etcd"))


@pytest.fixture
def keys(request: pytest.FixtureRequest) -> Keyspace:
    """A job id no other test (or earlier run on the same etcd) uses."""
    name = request.node.name.split("[")[0].removeprefix("test_")[:30].strip("_-.") or "t"
    return Keyspace(f"{name}-{next(_job_seq)}-{uuid.uuid4().hex[:6]}")


def _client(url: str) -> Any:
    return connect(EtcdConfig.from_url(url, rpc_timeout=5.0, connect_timeout=10.0))


@pytest.fixture
def make_client() -> Iterator[Callable[[str], Any]]:
    """Factory for etcd clients; all are closed at teardown."""
    made: list[Any] = []

    def make(url: str) -> Any:
        made.append(_client(url))
        return made[-1]

    yield make
    for c in made:
        c.close()


@pytest.fixture
def client(etcd_url: str, make_client: Callable[[str], Any]) -> Any:
    return make_client(etcd_url)


class MemberProcess:
    """A ``tests.helpers.member`` subprocess and the JSON lines it prints."""

    def __init__(self, args: list[str], stderr_path: str) -> None:
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.helpers.member", *args],
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        self.messages: queue.Queue[dict] = queue.Queue()
        self.seen: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.messages.put(json.loads(line))
            except ValueError:
                self.messages.put({"event": "garbage", "line": line.decode(errors="replace")})

    def expect(self, predicate: Callable[[dict], bool], timeout: float, what: str) -> dict:
        """The first message (already seen or coming) matching ``predicate``, within ``timeout``."""
        for msg in self.seen:
            if predicate(msg):
                return msg
        deadline = threading.Event()
        timer = threading.Timer(timeout, deadline.set)
        timer.start()
        try:
            while not deadline.is_set():
                try:
                    msg = self.messages.get(timeout=0.05)
                except queue.Empty:
                    if self.proc.poll() is not None and self.messages.empty():
                        break
                    continue
                self.seen.append(msg)
                if predicate(msg):
                    return msg
        finally:
            timer.cancel()
        raise AssertionError(
            f"member pid {self.pid} did not report {what} within {timeout:.1f}s "
            f"(exit code {self.proc.poll()}); seen {self.seen}; stderr: {self.stderr_tail()}"
        )

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stderr_tail(self, n: int = 2000) -> str:
        with open(self.stderr_path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")

    def stop(self, timeout: float = 5.0) -> None:
        """Ends the process whatever its state (stopped, hung, exited)."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)
                self.proc.kill()
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=timeout)
        finally:
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
            self._reader.join(timeout=timeout)


@pytest.fixture
def spawn_member(
    etcd_url: str, keys: Keyspace, tmp_path: Any
) -> Iterator[Callable[..., MemberProcess]]:
    """Start member processes of this test's job; each is killed and reaped at teardown."""
    started: list[MemberProcess] = []

    def spawn(
        member_id: str, *, ttl: float = 2.0, min_workers: int = 1, url: str | None = None
    ) -> MemberProcess:
        args = [
            "--etcd",
            url or etcd_url,
            "--job",
            keys.job,
            "--id",
            member_id,
            "--ttl",
            str(ttl),
            "--min-workers",
            str(min_workers),
        ]
        started.append(MemberProcess(args, str(tmp_path / f"{member_id}.stderr")))
        return started[-1]

    yield spawn
    for m in started:
        m.stop()
