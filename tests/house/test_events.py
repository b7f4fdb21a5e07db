"""The event log as a typed protocol: names from one enum, failures typed, one reader.

The names on disk stay the plain strings users' logs and ``elastic plot``
already hold; what changed is that a writer cannot invent one and a reader
cannot misspell one, and that failures are told apart by their type.
"""

from __future__ import annotations

import ast
import json
import os
import time
from types import SimpleNamespace
from typing import Any

import pytest

from elastic.base.errors import (
    CollectiveTimeoutError,
    EtcdUnavailableError,
    WorkerGroupError,
)
from elastic.base.events import (
    FAILURE_EVENTS,
    Event,
    EventLog,
    LogFollower,
    error_fields,
    read_events,
)
from elastic.coord.keys import Keyspace

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WRITERS = ("elastic", "chaos", "benchmarks")


def _log(tmp_path, source: str = "w-0") -> tuple[str, EventLog]:
    path = str(tmp_path / "events.jsonl")
    return path, EventLog(path, source=source)


# -- names ----------------------------------------------------------------------------


def test_emit_of_an_unknown_name_is_refused(tmp_path) -> None:
    path, log = _log(tmp_path)
    with pytest.raises(ValueError, match="unknown event 'stpe'"):
        log.emit("stpe", None, step=1)  # type: ignore[arg-type]
    log.close()
    assert read_events(path) == []  # nothing written


def test_a_failure_event_without_its_error_type_is_refused(tmp_path) -> None:
    path, log = _log(tmp_path)
    for event in FAILURE_EVENTS:
        with pytest.raises(ValueError, match="needs error_type"):
            log.emit(event, None, error="boom")
    log.close()
    assert read_events(path) == []


def test_the_log_holds_the_plain_names(tmp_path) -> None:
    path, log = _log(tmp_path)
    log.emit(Event.STEP, None, step=3, gen=1, world=2, loss=0.5)
    log.emit(Event.CHECKPOINT_COMMITTED, None, step=3)
    log.close()
    with open(path, encoding="utf-8") as f:
        raw = [json.loads(line)["event"] for line in f]
    assert raw == ["step", "checkpoint_committed"]
    assert all(type(name) is str for name in raw)
    # What readers parse matches the enum both ways, as a dict key too.
    events = read_events(path)
    assert events[0]["event"] == Event.STEP and Event.STEP == events[0]["event"]
    assert {e["event"]: e for e in events}[Event.CHECKPOINT_COMMITTED]["step"] == 3
    assert f"{Event.STEP}" == str(Event.STEP) == "step"


def test_every_name_is_one_member() -> None:
    values = [e.value for e in Event]
    assert len(values) == len(set(values))
    assert all(v == v.lower() and v.replace("_", "").isalpha() for v in values)


def _emit_calls() -> list[tuple[str, int, ast.expr | None]]:
    """(file, line, event argument) of every ``<x>.emit(...)`` call in the writers."""
    found = []
    for top in WRITERS:
        for root, _dirs, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read(), path)
                for node in ast.walk(tree):
                    if (
                        isinstance(node, ast.Call)
                        and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "emit"
                    ):
                        arg = (
                            node.args[0]
                            if node.args
                            else next((k.value for k in node.keywords if k.arg == "event"), None)
                        )
                        found.append((os.path.relpath(path, REPO), node.lineno, arg))
    return found


def test_no_emit_names_its_event_with_a_string_literal() -> None:
    calls = _emit_calls()
    assert len(calls) > 20  # the walk found the runtime's and the launcher's emits
    literal = [
        f"{path}:{line}"
        for path, line, arg in calls
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
    ]
    assert not literal, f"use elastic.base.events.Event: {literal}"
    named = [ast.unparse(arg) for _p, _l, arg in calls if arg is not None]
    assert all(n.startswith("Event.") for n in named), named


# -- failures carry their type ----------------------------------------------------------


def test_error_fields_name_the_exception_class() -> None:
    exc = EtcdUnavailableError("etcd did not answer within 5s")
    assert error_fields(exc) == {
        "error": "etcd did not answer within 5s",
        "error_type": "EtcdUnavailableError",
    }


def test_a_refused_stale_commit_is_recorded_by_type_and_the_chaos_check_finds_it(tmp_path) -> None:
    import torch

    from chaos.expectations import EXPECT_STALE_REFUSED, EXPECTATIONS
    from elastic.train.job import Job
    from storage import CheckpointStore

    store = CheckpointStore(f"file://{tmp_path}/ckpt")
    # A newer generation exists: the fence refuses this writer's commit.
    handle = store.save_async(4, {"x": torch.ones(3)}, generation=2, fence=lambda _s: False)
    path, log = _log(tmp_path)
    trainer = SimpleNamespace(
        _pending_save=handle,
        _pending_commits=True,
        events=log,
        config=SimpleNamespace(checkpoint_timeout=30.0),
    )
    Job._finish_pending_save(trainer, raise_errors=False)  # type: ignore[arg-type]
    log.close()
    store.close(timeout=30.0)
    [failed] = read_events(path)
    assert failed["event"] == Event.CHECKPOINT_FAILED
    assert failed["error_type"] == "StaleWriterError", failed
    assert "generation 2" in failed["error"]  # the message stays for people

    class Run:
        def events(self, name: Event) -> list[dict[str, Any]]:
            return [e for e in read_events(path) if e["event"] == name]

    [check] = EXPECTATIONS[EXPECT_STALE_REFUSED].check(Run(), None)  # type: ignore[arg-type]
    assert check.held, check
    # A failure of another type with the same words in its message does not count.
    failed.update(error_type="FenceError")
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(failed) + "\n")
    [check] = EXPECTATIONS[EXPECT_STALE_REFUSED].check(Run(), None)  # type: ignore[arg-type]
    assert not check.held, check


def test_a_failed_revoke_records_the_etcd_error_type(tmp_path) -> None:
    from elastic.launch.launcher import ElasticLauncher

    def unreachable(_key: str) -> Any:
        raise EtcdUnavailableError("etcd at 127.0.0.1:1 did not answer within 1s")

    path, log = _log(tmp_path, source="launcher-1")
    launcher = SimpleNamespace(
        client=SimpleNamespace(get=unreachable),
        keys=Keyspace("j"),
        events=log,
    )
    ElasticLauncher._revoke(launcher, "j-0")  # type: ignore[arg-type]
    log.close()
    [ev] = read_events(path)
    assert (ev["event"], ev["member"], ev["error_type"]) == (
        Event.REVOKE_FAILED,
        "j-0",
        "EtcdUnavailableError",
    )


class _Work:
    """A collective that never completes (a silent peer)."""

    def get_future(self) -> Any:
        return SimpleNamespace(then=lambda _cb: None)

    def is_completed(self) -> bool:
        return False


def _group(timeout: float) -> Any:
    from elastic.coord.world import World, WorldMember
    from elastic.train.group import WorkerGroup

    world = World("j", 1, (WorldMember("a"), WorldMember("b")))
    return WorkerGroup(world, 0, None, timeout=timeout)  # type: ignore[arg-type]


def test_a_collective_that_runs_out_its_timeout_is_a_collective_timeout() -> None:
    group = _group(timeout=0.05)
    with pytest.raises(CollectiveTimeoutError, match="collective timeout"):
        group._wait("all_reduce", _Work(), None)

    def late_failure(*_a: Any, **_k: Any) -> Any:
        time.sleep(0.06)  # the backend's own timeout fired: torch says so only in words
        raise RuntimeError("[gloo] Timed out waiting 50ms for recv operation to complete")

    with pytest.raises(CollectiveTimeoutError):
        group._run("all_reduce", late_failure)


def test_an_abandoned_or_broken_collective_is_not_a_timeout() -> None:
    group = _group(timeout=30.0)
    with pytest.raises(WorkerGroupError, match="abandoned") as abandoned:
        group._wait("all_reduce", _Work(), lambda _waited: "b's lease expired")
    assert type(abandoned.value) is WorkerGroupError

    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("Connection closed by peer")

    with pytest.raises(WorkerGroupError) as failed:
        group._run("all_reduce", broken)
    assert type(failed.value) is WorkerGroupError


# -- one reader ---------------------------------------------------------------------------


def test_every_reader_skips_a_torn_last_line_alike(tmp_path) -> None:
    from chaos.run import EventTail

    path = str(tmp_path / "events.jsonl")
    whole = [{"event": "step", "step": 1}, {"event": "generation", "gen": 2, "who": "ü"}]
    with open(path, "wb") as f:
        for e in whole:
            f.write(json.dumps(e, ensure_ascii=False).encode() + b"\n")
        f.write(b"garbage\n")  # a line torn earlier, then written over by the next event
        f.write(b'{"event": "st\xc3')  # the writer killed mid-line, inside a UTF-8 sequence
    tail = EventTail(path)
    readers = {
        "read_events": read_events(path),
        "LogFollower": LogFollower(path).poll(),
        "EventTail": tail.poll(),
    }
    assert all(got == whole for got in readers.values()), readers
    assert tail.of(Event.GENERATION) == [whole[1]]


def test_the_benchmarks_read_logs_with_the_one_reader() -> None:
    for name in ("recovery.py", "failures.py"):
        with open(os.path.join(REPO, "benchmarks", name), encoding="utf-8") as f:
            source = f.read()
        assert "json.loads(line)" not in source and "read_jsonl" not in source, name
        assert "read_events" in source, name


def test_a_log_not_written_yet_reads_empty_only_when_asked(tmp_path) -> None:
    missing = str(tmp_path / "not-yet.jsonl")
    assert read_events(missing, missing_ok=True) == []
    with pytest.raises(FileNotFoundError):
        read_events(missing)
