"""Fixtures of the checkpoint store tests: one location per backend, an S3 server."""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

from tests.storage.testlib import Location


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_location(tmp_path: Path) -> Iterator[Location]:
    loc = Location(
        url=f"file://{tmp_path}/ckpt", fs=fsspec.filesystem("file"), root=f"{tmp_path}/ckpt"
    )
    yield loc
    loc.close()


@pytest.fixture
def memory_location() -> Iterator[Location]:
    # An independent in-memory filesystem per test (the default one is process-global).
    fs = fsspec.filesystem("memory", global_store=False, skip_instance_cache=True)
    loc = Location(url="memory://ckpt", fs=fs, root="/ckpt", share_fs=True)
    yield loc
    loc.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free port for the whole session; stopped at the end."""
    server_module = pytest.importorskip(
        "moto.server", reason="moto[server] is not installed: no S3-compatible server to test on"
    )
    pytest.importorskip("s3fs", reason="s3fs is not installed: s3:// URLs cannot be opened")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3_options(endpoint: str) -> dict[str, Any]:
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint: str) -> tuple[Any, str]:
    """(raw s3fs filesystem, bucket) shared by the session; tests use unique prefixes."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options(s3_endpoint), skip_instance_cache=True)
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    fs.call_s3("create_bucket", Bucket=bucket)
    return fs, bucket


@pytest.fixture
def s3_location(s3_endpoint: str, s3_bucket: tuple[Any, str]) -> Iterator[Location]:
    fs, bucket = s3_bucket
    root = f"{bucket}/run-{uuid.uuid4().hex[:12]}"
    options = s3_options(s3_endpoint)
    loc = Location(url=f"s3://{root}", fs=fs, root=root, storage_options=options)
    yield loc
    loc.close()
