"""The embedded etcd refuses what it cannot serve and leaves nothing behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

import pytest

from elastic.base.errors import EtcdError
from elastic.coord.etcd import EmbeddedEtcd


def _elastic(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "elastic.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_a_taken_port_is_reported_not_claimed_as_listening():
    with EmbeddedEtcd() as other:  # a real etcd answers health checks on this port
        port = other.client_port
        run = _elastic("etcd", "--port", str(port))
    assert run.returncode != 0
    assert f"port {port} on 127.0.0.1 is taken" in run.stderr, run.stderr
    assert "listening" not in run.stdout, run.stdout


def test_a_data_dir_that_is_a_file_is_one_line_error(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    run = _elastic("etcd", "--data-dir", str(path))
    assert run.returncode != 0
    assert "exists and is not a directory" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def test_failed_start_removes_its_temporary_directory(private_tmp, tmp_path):
    never_healthy = tmp_path / "fake-etcd"
    never_healthy.write_text("#!/bin/sh\nexec sleep 30\n")
    never_healthy.chmod(0o755)
    server = EmbeddedEtcd(binary=str(never_healthy), start_timeout=0.5, start_attempts=1)
    with pytest.raises(EtcdError, match="did not become healthy"):
        server.start()
    assert os.listdir(private_tmp) == []
    assert server.process is None


def test_interrupt_during_start_removes_server_and_directory(private_tmp, monkeypatch):
    seen = {}

    def interrupted(self: EmbeddedEtcd) -> bool:
        seen["pid"] = self.process.pid
        raise KeyboardInterrupt

    monkeypatch.setattr(EmbeddedEtcd, "_healthy", interrupted)
    server = EmbeddedEtcd()
    with pytest.raises(KeyboardInterrupt):
        server.start()
    assert os.listdir(private_tmp) == []
    with pytest.raises(ProcessLookupError):
        os.kill(seen["pid"], 0)


def test_free_port_check_does_not_refuse_a_free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with EmbeddedEtcd(client_port=port) as server:
        assert server.client_port == port
