"""``elastic chaos run --hosts N``: the job's launchers on N hosts of a network test bed.

The command builds a bed of N hosts plus a control host (``chaos.netbed``:
network namespaces on a private bridge; root only), and runs itself again
inside the control host, told the bed through ``ELASTIC_CHAOS_BED``.  There
the runner and the job's etcd run; every launcher runs inside one of the N
hosts (the first on host 0, the others spread), and finds the address it
trains on from its route to etcd, as on real machines.  Faults that need
hosts (``link-down``) cut a host's link on the bridge; the control host's
link is never cut, so the runner always sees etcd.  The outer command waits
for the inner one and removes the bed in any case (the inner one dies with
it, and a bed whose owner died is removed by the next one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from chaos import netbed
from chaos.netbed import Host
from elastic.base.exitcodes import EXIT_INTERRUPTED, EXIT_USAGE
from elastic.base.procutil import dying_with_parent

BED_ENV = "ELASTIC_CHAOS_BED"
_BED_NET = 8  # 10.213.8.0/24: apart from the multi-host tests' bed (net 7)
_IDENTIFY_TIMEOUT = 10.0


@dataclass(frozen=True)
class Hosts:
    """The hosts a run's launchers go to, and the control host it runs on."""

    hosts: tuple[Host, ...]
    control: Host

    def __post_init__(self) -> None:
        if len(self.hosts) < 2:
            raise ValueError(f"a bed needs 2 or more hosts, got {len(self.hosts)}")

    def place(self, launcher_index: int) -> Host:
        """Where the ``launcher_index``-th launcher of a run goes (round robin)."""
        return self.hosts[launcher_index % len(self.hosts)]

    def of_pid(self, pid: int) -> Host | None:
        """The host whose network namespace ``pid`` runs in (None: another one)."""
        try:
            done = subprocess.run(
                ["ip", "netns", "identify", str(pid)],
                capture_output=True,
                text=True,
                timeout=_IDENTIFY_TIMEOUT,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        names = set(done.stdout.split())
        return next((h for h in self.hosts if h.netns in names), None)

    def to_env(self) -> str:
        return json.dumps(
            {"hosts": [h.to_json() for h in self.hosts], "control": self.control.to_json()}
        )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Hosts | None:
        raw = (os.environ if environ is None else environ).get(BED_ENV)
        if not raw:
            return None
        d = json.loads(raw)
        return cls(tuple(Host.from_json(h) for h in d["hosts"]), Host.from_json(d["control"]))


def chaos_argv(raw: Sequence[str]) -> list[str]:
    """``elastic chaos ...`` as given (from ``elastic`` or ``python -m chaos.runner``)."""
    argv = list(raw)
    return argv if argv[:1] == ["chaos"] else ["chaos", *argv]


def run_on_bed(n: int, argv: Sequence[str], prog: str = "elastic chaos") -> int:
    """Build a bed of ``n`` hosts, run ``elastic <argv>`` on its control host, remove
    the bed; the inner command's exit code."""
    why = netbed.unavailable()
    if why is not None:
        print(f"{prog}: error: --hosts needs network namespaces: {why}", file=sys.stderr)
        return EXIT_USAGE
    bed = netbed.TestBed(n + 1, net=_BED_NET)
    try:
        bed.create()
        outside = f"/proc/{os.getpid()}/ns/net"  # where the bridge is: this process's
        for h in bed.hosts:
            h.outside = outside
        hosts = Hosts(tuple(bed.hosts[:-1]), bed.hosts[-1])
        env = dict(os.environ, **{BED_ENV: hosts.to_env()})
        print(
            f"[chaos] test bed: {n} hosts {[h.address for h in hosts.hosts]}, runner and "
            f"etcd on {hosts.control.address}",
            file=sys.stderr,
            flush=True,
        )
        proc = subprocess.Popen(
            [
                *hosts.control.prefix(),
                *dying_with_parent([sys.executable, "-m", "elastic.cli", *argv]),
            ],
            env=env,
        )
        try:
            return proc.wait()
        except KeyboardInterrupt:
            # The inner command got the same Ctrl-C and stops its processes.
            try:
                proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                proc.kill()
            return EXIT_INTERRUPTED
    finally:
        bed.destroy()  # kills whatever still runs in any of its hosts
