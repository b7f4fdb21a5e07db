"""retry_call: which etcd errors are retried, and that every retry is bounded (no etcd)."""

from __future__ import annotations

import time

import grpc
import pytest
from etcd3 import exceptions as etcd_exc

from elastic.base.errors import EtcdRequestError, EtcdUnavailableError, SessionLostError
from elastic.coord.etcd import retry_call


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Flaky:
    """Fails with the given errors in turn, then returns "ok"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


@pytest.mark.parametrize(
    "error",
    [
        etcd_exc.ConnectionFailedError(),
        etcd_exc.ConnectionTimeoutError(),
        FakeRpcError(grpc.StatusCode.UNAVAILABLE, "etcdserver: leader changed"),
        FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: too many requests"),
    ],
    ids=["connection-failed", "timeout", "leader-changed", "too-many-requests"],
)
def test_transient_errors_are_retried_until_the_call_succeeds(error: BaseException) -> None:
    fn = Flaky(error, error)
    assert retry_call(fn, what="put x", timeout=10) == "ok"
    assert fn.calls == 3


@pytest.mark.parametrize(
    "code, details",
    [
        (grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied"),
        (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: request is too large"),
        (grpc.StatusCode.OUT_OF_RANGE, "etcdserver: mvcc: required revision has been compacted"),
    ],
    ids=["permission", "too-large", "compacted"],
)
def test_permanent_errors_fail_at_once_naming_the_request_and_reason(code, details) -> None:
    fn = Flaky(FakeRpcError(code, details))
    started = time.monotonic()
    with pytest.raises(EtcdRequestError, match=rf"put x refused \({code.name}\)") as info:
        retry_call(fn, what="put x", timeout=30)
    assert details in str(info.value)
    assert fn.calls == 1 and time.monotonic() - started < 1.0


def test_a_gone_lease_is_reported_as_a_lost_session_without_retrying() -> None:
    fn = Flaky(FakeRpcError(grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found"))
    with pytest.raises(SessionLostError, match="lease is gone"):
        retry_call(fn, what="put x", timeout=30)
    assert fn.calls == 1


def test_retries_stop_at_the_time_bound_and_the_error_states_it() -> None:
    def down() -> None:
        raise etcd_exc.ConnectionFailedError()

    started = time.monotonic()
    with pytest.raises(EtcdUnavailableError, match=r"failed for 0\.5s \(bound\)"):
        retry_call(down, what="get y", timeout=0.5)
    assert time.monotonic() - started < 3.0


def test_retries_stop_at_the_attempt_bound() -> None:
    fn = Flaky(*[etcd_exc.ConnectionFailedError() for _ in range(10)])
    with pytest.raises(EtcdUnavailableError):
        retry_call(fn, what="get y", timeout=60, attempts=3)
    assert fn.calls == 3
