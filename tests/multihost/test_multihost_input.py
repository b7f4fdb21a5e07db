"""Bad addresses and dead etcd members on several hosts: clear errors, running jobs unharmed."""

from __future__ import annotations

import time

from tests.runtime.harness import max_abs_diff

from .bed import HostLauncher, wait_members


def test_host_that_is_not_an_address_of_this_machine_is_refused_listing_its_addresses(
    make_bed, tmp_path, job_id
):
    bed = make_bed(2)
    etcd = bed.etcd_single(str(tmp_path / "etcd"))
    bad = HostLauncher(
        bed.hosts[1], str(tmp_path), job=job_id, etcd=etcd, extra=["--host", "10.9.9.9"]
    )
    assert bad.wait(60) == 1, bad.log_tail()
    log = bad.log_tail()
    assert (
        "elastic: error: --host 10.9.9.9 is not an address of this machine; its addresses: "
    ) in log, log
    assert f"{bed.hosts[1].address} (eth0)" in log, log
    assert not bad.events(), "nothing may start on bad input"


def test_loopback_host_joining_a_multi_host_job_is_refused_and_the_job_goes_on(
    make_bed, tmp_path, job_id, reference
):
    bed = make_bed(2)
    etcd = bed.etcd_single(str(tmp_path / "etcd"))
    first = HostLauncher(
        bed.hosts[0], str(tmp_path), job=job_id, etcd=etcd, extra=["--min-workers", "2"]
    )
    wait_members(bed.hosts[1], etcd, job_id, 1, timeout=120)
    bad = HostLauncher(
        bed.hosts[1], str(tmp_path / "bad"), job=job_id, etcd=etcd, extra=["--host", "127.0.0.1"]
    )
    assert bad.wait(60) == 1, bad.log_tail()
    log = bad.log_tail()
    assert "this host's address 127.0.0.1 is loopback, but member " in log, log
    assert f"is on another host ({bed.hosts[0].address})" in log, log
    assert first.proc.poll() is None, first.log_tail()
    # A correct second host completes the job the refused one could not join.
    good = HostLauncher(bed.hosts[1], str(tmp_path), job=job_id, etcd=etcd)
    for launcher in (first, good):
        assert launcher.wait(240) == 0, first.log_tail() + good.log_tail()
    assert max_abs_diff(first.out, reference) <= 1e-5


def test_etcd_with_every_member_dead_fails_within_the_stated_bound(make_bed, tmp_path, job_id):
    bed = make_bed(3)
    etcd, servers = bed.etcd_cluster(str(tmp_path / "etcd"))
    for server in servers:
        server.kill()
        server.wait(timeout=30)
    t0 = time.monotonic()
    launcher = HostLauncher(
        bed.hosts[1], str(tmp_path), job=job_id, etcd=etcd, extra=["--etcd-timeout", "3"]
    )
    assert launcher.wait(60) == 1, launcher.log_tail()
    took = time.monotonic() - t0
    log = launcher.log_tail()
    assert f"elastic: error: etcd: connecting to {etcd} failed for 3.0s (bound)" in log, log
    # 3 s of retries plus starting an interpreter and importing the runtime.
    assert took < 40, took
    assert not launcher.events()


def test_joining_a_job_whose_member_advertises_loopback_is_refused_naming_that_member(
    make_bed, tmp_path, job_id
):
    bed = make_bed(2)
    etcd = bed.etcd_single(str(tmp_path / "etcd"))
    stranded = HostLauncher(
        bed.hosts[1],
        str(tmp_path),
        job=job_id,
        etcd=etcd,
        extra=["--host", "127.0.0.1", "--min-workers", "2"],
    )
    wait_members(bed.hosts[0], etcd, job_id, 1, timeout=120)
    joiner = HostLauncher(bed.hosts[0], str(tmp_path), job=job_id, etcd=etcd)
    assert joiner.wait(60) == 1, joiner.log_tail()
    log = joiner.log_tail()
    assert (
        "advertises the loopback address 127.0.0.1, which this host "
        f"({bed.hosts[0].address}) cannot reach" in log
    ), log
    assert stranded.proc.poll() is None, stranded.log_tail()
