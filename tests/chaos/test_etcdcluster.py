"""The chaos suite's etcd cluster: a leader to kill, the others go on, the member returns."""

from __future__ import annotations

import pytest

from chaos.etcdcluster import EtcdCluster
from elastic.coord.etcd import EtcdConfig, connect, retry_call


def test_the_cluster_loses_its_leader_serves_on_and_takes_it_back(tmp_path) -> None:
    with EtcdCluster(str(tmp_path / "etcd"), size=3) as cluster:
        assert len(cluster.urls) == 3 and cluster.url == ",".join(cluster.urls)
        leader = cluster.leader()
        assert leader in cluster.urls
        cluster.kill_member(leader)
        assert not cluster.member(leader).running()
        # A client on the endpoint list fails over to the two that are left
        # (the runtime's bounded retry: a request to the dead member fails once).
        client = connect(EtcdConfig.from_url(cluster.url, connect_timeout=20.0, rpc_timeout=2.0))
        try:
            retry_call(lambda: client.put("/k", "v"), what="a put", timeout=30.0)
            assert client.get("/k")[0] == b"v"
            assert cluster.leader() != leader
            cluster.restart_member(leader)
            assert cluster.member(leader).running()
            cluster.kill()  # every member: a whole-cluster crash
            assert cluster.process is None
            cluster.restart()  # back on the same data dirs
            assert retry_call(lambda: client.get("/k"), what="a get", timeout=30.0)[0] == b"v"
        finally:
            client.close()
    assert cluster.process is None


def test_a_url_that_is_no_member_is_named(tmp_path) -> None:
    cluster = EtcdCluster(str(tmp_path / "etcd"), size=1).start()
    try:
        with pytest.raises(ValueError, match="not a member"):
            cluster.kill_member("http://127.0.0.1:1")
    finally:
        cluster.stop()
