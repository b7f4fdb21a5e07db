"""Bad input and bad locations give one clear StorageError subclass naming the bad value."""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

from chaos.faultfs import MUTATIONS, Fault, FaultPlan, FaultyFileSystem
from storage import (
    CheckpointNotFoundError,
    CheckpointStore,
    FenceError,
    InvalidArgumentError,
    InvalidURLError,
    RetryPolicy,
    StorageAccessError,
    StorageError,
    StorageUnavailableError,
    UnsupportedFormatError,
    UnsupportedStateError,
    layout,
)
from storage import manifest as manifest_format
from tests.storage.conftest import s3_options
from tests.storage.testlib import FAST_RETRY, Location


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("nosuch://bucket/run", "unknown URL scheme 'nosuch'"),
        ("simplecache::bogus://x", "unknown URL scheme 'bogus'"),
        ("", "non-empty string"),
        ("memory://", "names no location"),
    ],
)
def test_a_bad_url_is_refused_on_construction_naming_it(url: str, message: str) -> None:
    with pytest.raises(InvalidURLError, match=message):
        CheckpointStore(url)


def test_a_url_whose_backend_is_not_installed_says_so() -> None:
    pytest.importorskip("fsspec.implementations.local")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed here; nothing is missing")
    with pytest.raises(InvalidURLError, match="'gcs'.*not installed"):
        CheckpointStore("gcs://bucket/run")


def test_errors_share_one_base_class() -> None:
    with pytest.raises(StorageError):
        CheckpointStore("nosuch://x")


def test_fs_and_storage_options_are_exclusive() -> None:
    with pytest.raises(InvalidArgumentError, match="either fs or storage_options"):
        CheckpointStore("memory://x", fs=fsspec.filesystem("memory"), storage_options={"a": 1})


@pytest.mark.skipif(
    not os.path.isdir("/sys/kernel"), reason="needs Linux /sys, read-only even for root"
)
def test_a_read_only_local_location_is_a_clear_error() -> None:
    url = f"file:///sys/kernel/ckpt-{uuid.uuid4().hex[:8]}"
    store = CheckpointStore(url, retry=FAST_RETRY)
    with pytest.raises(StorageAccessError, match=r"/sys/kernel/ckpt-.*(denied|not permitted)"):
        store.save(1, {"x": torch.ones(1)})


def test_a_read_only_bucket_refuses_saves_but_still_serves_loads(memory_location: Location) -> None:
    memory_location.store().save(1, {"x": torch.ones(2)})
    plan = FaultPlan((Fault.fail(MUTATIONS, times=None, error=PermissionError),))
    store = CheckpointStore(memory_location.url, fs=FaultyFileSystem(memory_location.fs, plan))
    with pytest.raises(StorageAccessError, match=r"permission denied \(read-only location\?\)"):
        store.save(2, {"x": torch.ones(2)})
    assert store.load()[0] == 1
    assert [i.step for i in store.list()] == [1]


def test_a_location_under_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a directory")
    store = CheckpointStore(f"file://{tmp_path}/afile/ckpt", retry=FAST_RETRY)
    with pytest.raises(StorageAccessError, match="afile/ckpt"):
        store.save(1, {"x": torch.ones(1)})


@pytest.mark.s3
def test_an_unreachable_endpoint_fails_after_bounded_retries() -> None:
    pytest.importorskip("s3fs", reason="s3fs is not installed")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options: dict[str, Any] = {
        **s3_options(f"http://127.0.0.1:{port}"),
        "config_kwargs": {"connect_timeout": 0.5, "retries": {"max_attempts": 1}},
    }
    retry = RetryPolicy(max_attempts=2, max_time_s=60, initial_backoff_s=0.01, max_backoff_s=0.02)
    store = CheckpointStore("s3://bucket/run", storage_options=options, retry=retry)
    with pytest.raises(StorageUnavailableError, match=r"s3://bucket/run.*failed after 2 attempt"):
        store.list()


@pytest.mark.s3
def test_a_bucket_that_does_not_exist(s3_endpoint: str) -> None:
    options = s3_options(s3_endpoint)
    store = CheckpointStore(f"s3://no-such-{uuid.uuid4().hex[:8]}/run", storage_options=options)
    with pytest.raises(CheckpointNotFoundError, match="empty location"):
        store.load()
    with pytest.raises(StorageAccessError, match="does not exist"):
        store.save(1, {"x": torch.ones(1)})


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"step": -1}, "step must be an int >= 0, got -1"),
        ({"step": True}, "step must be an int"),
        ({"step": 1.0}, "step must be an int"),
        ({"generation": -2}, "generation must be an int >= 0, got -2"),
        ({"world_size": 0}, "world_size must be an int >= 1, got 0"),
        ({"rank": 3, "world_size": 3}, "rank 3 is out of range for world_size 3"),
        ({"timeout": 0}, "timeout must be > 0"),
        ({"metadata": {"loss": float("nan")}}, r"metadata\['loss'\]"),
        ({"metadata": {"when": object()}}, r"metadata\['when'\]"),
        ({"state": [1, 2]}, "state must be a dict"),
        ({"state": {1: torch.ones(1)}}, "top-level keys of state must be str"),
        ({"per_rank_state": "rng"}, "per_rank_state must be a dict"),
    ],
)
def test_bad_save_arguments_are_named(memory_location: Location, kwargs: dict, named: str) -> None:
    args = {"step": 1, "state": {"x": torch.ones(1)}, **kwargs}
    with pytest.raises(InvalidArgumentError, match=named):
        memory_location.store().save(args.pop("step"), args.pop("state"), **args)
    assert memory_location.all_files() == []


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (object(), r"optim.state\[0\].buf has unsupported type builtins.object"),
        (torch.ones(2).to_sparse(), r"optim.state\[0\].buf is layout torch.sparse_coo"),
        (torch.empty(2, device="meta"), "meta tensor"),
        ({(1, 2): 3}, r"state key \(1, 2\)"),
        (b"bytes", "unsupported type builtins.bytes"),
    ],
)
def test_state_that_cannot_round_trip_is_refused_naming_its_key(
    memory_location: Location, value: Any, named: str
) -> None:
    state = {"optim": {"state": {0: {"buf": value}}}}
    with pytest.raises(UnsupportedStateError, match=named):
        memory_location.store().save(1, state)


def test_a_fence_that_returns_a_non_bool_is_an_error(memory_location: Location) -> None:
    with pytest.raises(FenceError, match="returned None"):
        memory_location.store().save(1, {"x": torch.ones(1)}, fence=lambda step: None)
    assert not memory_location.exists(memory_location.manifest(1))


def test_a_manifest_from_a_newer_format_is_not_silently_skipped(memory_location: Location) -> None:
    memory_location.store().save(1, {"x": torch.ones(1)})
    memory_location.store().save(2, {"x": torch.ones(1)})
    rel = memory_location.manifest(2)
    envelope = json.loads(memory_location.read(rel))
    envelope["version"] = manifest_format.VERSION + 1
    envelope["sha256"] = manifest_format._canonical_digest(
        envelope["format"], envelope["version"], envelope["body"]
    )
    memory_location.write(rel, json.dumps(envelope).encode())
    with pytest.raises(UnsupportedFormatError, match=f"version {manifest_format.VERSION + 1}"):
        memory_location.store().load()


def test_load_with_a_bad_step_argument(memory_location: Location) -> None:
    memory_location.store().save(1, {"x": torch.ones(1)})
    with pytest.raises(InvalidArgumentError, match="step must be an int >= 0, got 'latest'"):
        memory_location.store().load("latest")  # type: ignore[arg-type]
    with pytest.raises(CheckpointNotFoundError, match=f"{layout.step_dir(0)}|step 0"):
        memory_location.store().verify(0)


def test_committer_stops_waiting_for_parts_when_told_to_abandon(tmp_path) -> None:
    import threading
    import time

    from storage import CheckpointStore, SaveAbandonedError

    store = CheckpointStore(f"file://{tmp_path}/ck")
    generation_over = threading.Event()
    threading.Timer(0.2, generation_over.set).start()
    t0 = time.monotonic()
    # Rank 1 of 2 never writes its part; without abandon this waits 60 s.
    with pytest.raises(SaveAbandonedError, match=r"waiting for rank\(s\) \[1\]"):
        store.save(
            4,
            {"w": torch.zeros(8)},
            rank=0,
            world_size=2,
            generation=3,
            timeout=60,
            abandon=generation_over.is_set,
        )
    assert time.monotonic() - t0 < 10
    assert store.latest() is None
