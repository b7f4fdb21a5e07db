"""Run inside a test-bed host: print a job's commit records from etcd as JSON.

python -m tests.multihost.dump URL JOB
"""

from __future__ import annotations

import json
import sys

from elastic.coord.etcd import EtcdConfig, connect
from elastic.coord.keys import Keyspace


def main(url: str, job: str) -> int:
    client = connect(EtcdConfig.from_url(url, connect_timeout=30.0))
    try:
        keys = Keyspace(job)
        commits = [json.loads(v) for v, _ in client.get_prefix(keys.commits)]
        print(json.dumps({"commits": commits}))
        return 0
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
