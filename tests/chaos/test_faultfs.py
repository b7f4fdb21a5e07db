"""FaultyFileSystem: counting, and each programmable fault, on memory and local disk."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import fsspec
import pytest
from fsspec import AbstractFileSystem
from fsspec.spec import AbstractBufferedFile

from chaos.faultfs import (
    Fault,
    FaultPlan,
    FaultyFileSystem,
    InjectedFault,
    IOCall,
    SimulatedCrash,
)


@pytest.fixture
def mem() -> AbstractFileSystem:
    return fsspec.filesystem("memory", global_store=False, skip_instance_cache=True)


def faulty(fs: AbstractFileSystem, *faults: Fault, crash_at: int | None = None, seed: int = 0):
    return FaultyFileSystem(fs, FaultPlan(faults, crash_at=crash_at, seed=seed))


def differing_bits(a: bytes, b: bytes) -> int:
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b, strict=True))


def test_every_call_is_numbered_and_logged(mem: AbstractFileSystem) -> None:
    fs = faulty(mem)
    fs.pipe_file("/d/a", b"hello")
    assert fs.cat_file("/d/a") == b"hello"
    with fs.open("/d/b", "wb") as f:
        f.write(b"12")
        f.write(b"34")
    with fs.open("/d/b", "rb") as f:
        assert f.read() == b"1234"
    fs.ls("/d")
    fs.rm("/d/a")
    assert [(c.op, c.path) for c in fs.log] == [
        ("pipe", "/d/a"),
        ("cat", "/d/a"),
        ("create", "/d/b"),
        ("write", "/d/b"),
        ("write", "/d/b"),
        ("close", "/d/b"),
        ("open", "/d/b"),
        ("read", "/d/b"),
        ("close", "/d/b"),
        ("ls", "/d"),
        ("rm", "/d/a"),
    ]
    assert fs.log[0] == IOCall(1, "pipe", "/d/a") and fs.calls == 11
    assert fs.count("write") == 2 and fs.count({"read", "cat"}) == 2


def test_a_transient_fault_fails_n_matching_calls_then_lets_them_through(
    mem: AbstractFileSystem,
) -> None:
    fs = faulty(mem, Fault.fail("pipe", nth=2, times=2))
    fs.pipe_file("/a", b"1")
    for _ in range(2):
        with pytest.raises(InjectedFault, match="injected fault at I/O call #[23]: pipe /b"):
            fs.pipe_file("/b", b"2")
    fs.pipe_file("/b", b"2")
    assert mem.cat_file("/b") == b"2"
    assert issubclass(InjectedFault, ConnectionError)  # looks transient to a retrying client


def test_a_permanent_fault_never_lets_a_call_through(mem: AbstractFileSystem) -> None:
    fs = faulty(mem, Fault.fail("cat", times=None, error=PermissionError))
    mem.pipe_file("/a", b"1")
    for _ in range(5):
        with pytest.raises(PermissionError):
            fs.cat_file("/a")
    assert fs.exists("/a")  # other ops are unaffected


def test_faults_match_paths_by_glob(mem: AbstractFileSystem) -> None:
    fs = faulty(mem, Fault.fail(None, "*/manifest.json", times=None))
    fs.pipe_file("/run/data.bin", b"x")
    with pytest.raises(InjectedFault):
        fs.pipe_file("/run/manifest.json", b"{}")
    with pytest.raises(InjectedFault):
        fs.exists("/run/manifest.json")


def test_a_delay_slows_the_matching_call(mem: AbstractFileSystem) -> None:
    fs = faulty(mem, Fault.delay(0.05, "pipe"))
    started = time.monotonic()
    fs.pipe_file("/a", b"1")
    assert time.monotonic() - started >= 0.05
    assert mem.cat_file("/a") == b"1"


def test_a_truncated_write_reports_success_but_stores_part_of_the_data(
    mem: AbstractFileSystem,
) -> None:
    fs = faulty(mem, Fault.truncate("write", keep=0.25))
    with fs.open("/a", "wb") as f:
        assert f.write(b"abcdefgh") == 8
    assert mem.cat_file("/a") == b"ab"
    faulty(mem, Fault.truncate("pipe", keep=0.5)).pipe_file("/b", b"abcd")
    assert mem.cat_file("/b") == b"ab"


def test_a_truncated_read_returns_fewer_bytes(mem: AbstractFileSystem) -> None:
    mem.pipe_file("/a", b"abcdefgh")
    fs = faulty(mem, Fault.truncate("read", keep=0.5))
    with fs.open("/a", "rb") as f:
        buf = bytearray(8)
        assert f.readinto(buf) == 4 and bytes(buf[:4]) == b"abcd"


@pytest.mark.parametrize("op", ["write", "pipe"])
def test_a_bitflip_on_write_changes_exactly_one_bit(mem: AbstractFileSystem, op: str) -> None:
    data = bytes(range(256))
    fs = faulty(mem, Fault.bitflip(op), seed=3)
    if op == "pipe":
        fs.pipe_file("/a", data)
    else:
        with fs.open("/a", "wb") as f:
            f.write(data)
    stored = mem.cat_file("/a")
    assert differing_bits(data, stored) == 1


@pytest.mark.parametrize("how", ["cat", "read", "readinto"])
def test_a_bitflip_on_read_changes_exactly_one_bit(mem: AbstractFileSystem, how: str) -> None:
    data = bytes(range(256))
    mem.pipe_file("/a", data)
    fs = faulty(mem, Fault.bitflip({"read", "cat"}))
    if how == "cat":
        got = fs.cat_file("/a")
    else:
        with fs.open("/a", "rb") as f:
            if how == "read":
                got = f.read()
            else:
                buf = bytearray(256)
                assert f.readinto(buf) == 256
                got = bytes(buf)
    assert differing_bits(data, got) == 1
    assert mem.cat_file("/a") == data  # the stored copy is intact


def test_a_seed_makes_random_faults_reproducible(mem: AbstractFileSystem) -> None:
    def failing_calls(seed: int) -> list[int]:
        fs = faulty(mem, Fault.fail("exists", times=None, probability=0.5), seed=seed)
        failed = []
        for i in range(40):
            try:
                fs.exists("/x")
            except InjectedFault:
                failed.append(i)
        return failed

    assert failing_calls(1) == failing_calls(1)
    assert failing_calls(1) != failing_calls(2)
    assert 5 < len(failing_calls(1)) < 35


def test_a_crash_stops_all_later_io_like_a_dead_process(mem: AbstractFileSystem) -> None:
    fs = faulty(mem, crash_at=3)
    fs.pipe_file("/a", b"1")
    fs.exists("/a")
    with pytest.raises(SimulatedCrash, match="#3: cat /a"):
        fs.cat_file("/a")
    assert fs.crashed and not issubclass(SimulatedCrash, Exception)
    with pytest.raises(SimulatedCrash, match="after a simulated crash"):
        fs.exists("/a")
    fs.reset()  # a new process
    assert fs.cat_file("/a") == b"1" and fs.calls == 1


def test_a_crash_can_target_the_nth_matching_call(mem: AbstractFileSystem) -> None:
    fs = faulty(mem, Fault.crash("write", nth=2))
    with pytest.raises(SimulatedCrash):
        with fs.open("/a", "wb") as f:
            f.write(b"first")
            f.write(b"second")
    assert mem.cat_file("/a") == b"first"  # what was written before the crash stays


def test_a_crash_on_local_disk_keeps_flushed_bytes_and_loses_buffered_ones(
    tmp_path: Path,
) -> None:
    fs = faulty(fsspec.filesystem("file"), crash_at=5)
    path = f"{tmp_path}/f.bin"
    with pytest.raises(SimulatedCrash, match="#5: flush"):
        with fs.open(path, "wb") as f:  # call 1
            f.write(b"abc")  # 2
            f.flush()  # 3: reaches the kernel
            f.write(b"def")  # 4: only in the process's buffer
            f.flush()  # 5: the process dies first
    assert Path(path).read_bytes() == b"abc"


class _UploadFile(AbstractBufferedFile):
    """Like an object-store upload: nothing is visible until commit()."""

    def _initiate_upload(self) -> None:
        pass

    def _upload_chunk(self, final: bool = False) -> bool:
        if final and self.autocommit:
            self.commit()
        return False

    def commit(self) -> None:
        self.fs.committed.append(self.path)

    def discard(self) -> None:
        self.fs.discarded.append(self.path)


class _UploadFS(AbstractFileSystem):
    protocol = "upload"
    cachable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.committed: list[str] = []
        self.discarded: list[str] = []

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> _UploadFile:
        return _UploadFile(self, path, mode)


def test_a_crash_abandons_an_upload_without_committing_it() -> None:
    inner = _UploadFS()
    fs = faulty(inner, Fault.crash("write", nth=2))
    with pytest.raises(SimulatedCrash):
        with fs.open("/bucket/obj", "wb") as f:
            f.write(b"part one")
            f.write(b"part two")
    del f
    assert inner.discarded == ["/bucket/obj"] and inner.committed == []


def test_local_renames_and_links_are_counted(tmp_path: Path) -> None:
    fs = faulty(fsspec.filesystem("file"))
    fs.pipe_file(f"{tmp_path}/a", b"1")
    fs.link(f"{tmp_path}/a", f"{tmp_path}/b")
    fs.mv(f"{tmp_path}/a", f"{tmp_path}/c")
    assert [c.op for c in fs.log] == ["pipe", "link", "mv"]
    assert fs.local_file


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Fault("explode"), "action"),
        (lambda: Fault.fail("teleport"), "unknown op"),
        (lambda: Fault.bitflip("ls"), "data ops"),
        (lambda: Fault.fail("pipe", nth=0), "nth"),
        (lambda: Fault.truncate("write", keep=1.0), "keep"),
        (lambda: FaultPlan(crash_at=0), "crash_at"),
    ],
)
def test_bad_fault_definitions_are_refused(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
