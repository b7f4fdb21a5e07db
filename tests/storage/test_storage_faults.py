"""Storage faults injected with FaultyFileSystem: bounded retries, clear errors, detection."""

from __future__ import annotations

import errno
import logging
import time

import pytest
import torch

from chaos.faultfs import Fault, FaultPlan, FaultyFileSystem, SimulatedCrash
from storage import (
    CheckpointStore,
    CorruptCheckpointError,
    InvalidArgumentError,
    RetryPolicy,
    StorageAccessError,
    StorageUnavailableError,
    is_transient,
)
from tests.storage.testlib import FAST_RETRY, Location, assert_same


def state(i: int) -> dict:
    return {"w": torch.arange(100, dtype=torch.float32) * i, "b": torch.ones(3), "i": i}


def faulty(loc: Location, *faults: Fault, retry: RetryPolicy = FAST_RETRY) -> tuple:
    ffs = FaultyFileSystem(loc.fs, FaultPlan(faults, seed=7))
    return CheckpointStore(loc.url, fs=ffs, retry=retry), ffs


@pytest.mark.parametrize("op", ["exists", "create", "write", "close", "pipe"])
def test_transient_failures_of_a_save_are_retried_and_the_save_succeeds(
    memory_location: Location, caplog: pytest.LogCaptureFixture, op: str
) -> None:
    store, ffs = faulty(memory_location, Fault.fail(op, times=2))
    with caplog.at_level(logging.WARNING, logger="storage"):
        store.save(1, state(1))
    assert sum(1 for call in ffs.log if call.op == op) >= 3  # two failures, then success
    assert "retrying" in caplog.text
    assert_same(state(1), memory_location.store().load()[1])


@pytest.mark.parametrize("op", ["ls", "cat", "open", "read"])
def test_transient_failures_of_a_load_are_retried(memory_location: Location, op: str) -> None:
    memory_location.store().save(1, state(1))
    store, _ = faulty(memory_location, Fault.fail(op, times=2))
    assert_same(state(1), store.load()[1])


def test_a_persistent_failure_gives_up_after_the_attempt_bound_naming_the_file(
    memory_location: Location,
) -> None:
    retry = RetryPolicy(max_attempts=4, max_time_s=30, initial_backoff_s=0.001, max_backoff_s=0.002)
    store, ffs = faulty(memory_location, Fault.fail("pipe", times=None), retry=retry)
    with pytest.raises(StorageUnavailableError, match=r"manifest\.json failed after 4 attempt"):
        store.save(1, state(1))
    assert ffs.count("pipe") == 4
    assert memory_location.store().list() == []


def test_a_persistent_failure_gives_up_after_the_time_bound(memory_location: Location) -> None:
    retry = RetryPolicy(
        max_attempts=10_000, max_time_s=0.3, initial_backoff_s=0.01, max_backoff_s=0.05
    )
    store, ffs = faulty(memory_location, Fault.fail("exists", times=None), retry=retry)
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError, match="failed after"):
        store.save(1, state(1))
    assert time.monotonic() - started < 30.0  # generous: the machine may be loaded
    assert 1 < ffs.count("exists") < 10_000


def test_permanent_errors_are_not_retried(memory_location: Location) -> None:
    store, ffs = faulty(memory_location, Fault.fail("pipe", times=None, error=PermissionError))
    with pytest.raises(StorageAccessError, match="permission denied"):
        store.save(1, state(1))
    assert ffs.count("pipe") == 1


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault.bitflip("write", "*data-*"), "checksum"),
        (Fault.truncate("write", "*data-*"), "size"),
        (Fault.bitflip("pipe", "*manifest.json"), "manifest"),
        (Fault.truncate("pipe", "*manifest.json", keep=0.9), "manifest"),
    ],
)
def test_corrupted_writes_are_detected_by_load_and_verify(
    memory_location: Location, fault: Fault, reason: str
) -> None:
    memory_location.store().save(1, state(1))
    store, _ = faulty(memory_location, fault)
    store.save(2, state(2))  # the storage silently damaged what it was given
    report = memory_location.store().verify()
    assert report.bad_steps == [2]
    assert [p.reason for p in report.problems] == [reason]
    step, loaded = memory_location.store().load()
    assert step == 1
    assert_same(state(1), loaded)


def test_a_bit_flipped_read_is_detected_and_load_falls_back(memory_location: Location) -> None:
    for step in (1, 2):
        memory_location.store().save(step, state(step))
    store, _ = faulty(memory_location, Fault.bitflip("read", "*step-000000000002/*data-*"))
    step, loaded = store.load()
    assert step == 1
    assert_same(state(1), loaded)


def test_every_read_corrupted_means_no_checkpoint_verifies(memory_location: Location) -> None:
    for step in (1, 2):
        memory_location.store().save(step, state(step))
    store, _ = faulty(memory_location, Fault.bitflip("read", times=None))
    with pytest.raises(CorruptCheckpointError, match="no checkpoint under memory://ckpt verifies"):
        store.load()


def test_slow_storage_only_slows_the_save(memory_location: Location) -> None:
    store, ffs = faulty(memory_location, Fault.delay(0.02, "write", times=None))
    store.save(1, state(1))
    assert ffs.count("write") >= 1
    assert_same(state(1), memory_location.store().load()[1])


def test_a_crash_is_not_retried(memory_location: Location) -> None:
    store, ffs = faulty(memory_location, Fault.crash("write"))
    with pytest.raises(SimulatedCrash):
        store.save(1, state(1))
    assert ffs.count("write") == 1


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionResetError("reset"), True),
        (TimeoutError("slow"), True),
        (OSError(errno.EIO, "io"), True),
        (OSError(errno.EBUSY, "SlowDown"), True),
        (type("EndpointConnectionError", (Exception,), {})("down"), True),
        (FileNotFoundError("gone"), False),
        (PermissionError("ro"), False),
        (OSError(errno.EINVAL, "bad request"), False),
        (ValueError("bug"), False),
        (SimulatedCrash("dead"), False),
    ],
)
def test_transient_errors_are_told_apart_from_permanent_ones(
    exc: BaseException, transient: bool
) -> None:
    assert is_transient(exc) is transient


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_time_s": -1}, "max_time_s"),
        ({"initial_backoff_s": 1.0, "max_backoff_s": 0.5}, "max_backoff_s"),
    ],
)
def test_retry_policy_rejects_bad_values_naming_them(kwargs: dict, named: str) -> None:
    with pytest.raises(InvalidArgumentError, match=named):
        RetryPolicy(**kwargs)
