"""Run inside a test-bed host: wait until a job has N member records in etcd.

    python -m tests.multihost.probe URL JOB N TIMEOUT

Exit 0 when it has, 1 when ``TIMEOUT`` seconds passed first (the test process
itself is outside every namespace and cannot reach the bed's etcd).
"""

from __future__ import annotations

import sys
import time

from elastic.coord.etcd import EtcdConfig, connect
from elastic.coord.keys import Keyspace


def main(url: str, job: str, n: str, timeout: str) -> int:
    deadline = time.monotonic() + float(timeout)
    client = connect(EtcdConfig.from_url(url, connect_timeout=float(timeout)))
    try:
        prefix = Keyspace(job).members
        while time.monotonic() < deadline:
            if len(list(client.get_prefix(prefix))) >= int(n):
                return 0
            time.sleep(0.1)
        return 1
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
