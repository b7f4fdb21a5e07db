"""`elastic ckpt`: list, verify, prune, gc and export checkpoints from the command line.

    elastic ckpt list   URL [--json]
    elastic ckpt verify URL [--step N]          exit 1 naming each bad file
    elastic ckpt prune  URL --keep N [--every K] [--no-verify]
    elastic ckpt gc     URL [--grace SECONDS]
    elastic ckpt export URL [--step N] [--key model] --out model.pt [--force]

Every command takes --checkpoint-key-file PATH: manifests must then be signed
with that key (`verify` says "signed", "unsigned" or "bad signature" per step).

Exit codes: 0 success; 1 a failed check or operation (bad files, empty location,
unknown step, storage error); 2 bad usage (bad URL or option).  Errors are one
line on stderr.  Also runnable as `python -m storage.cli ckpt ...`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from elastic.base.exitcodes import EXIT_FAILED, EXIT_USAGE
from storage.errors import InvalidArgumentError, StorageError
from storage.shards import with_full_optimizer

if TYPE_CHECKING:
    from storage.store import CheckpointStore

# torch and the store are imported inside the handlers: building the parser
# (every `elastic` command does) must not pay for importing torch.

Handler = Callable[[argparse.Namespace], int]


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _fail(args: argparse.Namespace, message: str, code: int = EXIT_FAILED) -> int:
    print(f"elastic ckpt {args.ckpt_command}: error: {message}", file=sys.stderr)
    return code


def _store(args: argparse.Namespace) -> CheckpointStore:
    options = None
    if args.storage_options:
        try:
            options = json.loads(args.storage_options)
        except ValueError as exc:
            raise InvalidArgumentError(f"--storage-options is not valid JSON: {exc}") from exc
        if not isinstance(options, dict):
            raise InvalidArgumentError("--storage-options must be a JSON object")
    from storage.signing import load_key_file
    from storage.store import CheckpointStore

    key = load_key_file(args.checkpoint_key_file) if args.checkpoint_key_file else None
    return CheckpointStore(args.url, storage_options=options, key=key)


def _guarded(handler: Callable[[argparse.Namespace, CheckpointStore], int]) -> Handler:
    """Open the store and turn storage errors into one line on stderr and an exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args, _store(args))
        except InvalidArgumentError as exc:
            return _fail(args, str(exc), EXIT_USAGE)
        except StorageError as exc:
            return _fail(args, str(exc))

    run.__name__ = handler.__name__
    return run


@_guarded
def cmd_list(args: argparse.Namespace, store: CheckpointStore) -> int:
    infos = store.list()
    if args.json:
        print(json.dumps([info.to_json() for info in infos], indent=2))
    else:
        for info in infos:
            created = datetime.datetime.fromtimestamp(info.created).isoformat(timespec="seconds")
            meta = f"  {json.dumps(info.metadata)}" if info.metadata else ""
            print(
                f"step {info.step:>10}  gen {info.generation:>4}  world {info.world_size:>3}  "
                f"{info.num_files:>4} files  {_human(info.total_bytes):>10}  {created}{meta}"
            )
    if not infos:
        return _fail(args, f"no committed checkpoint under {store.url} (empty location)")
    return 0


@_guarded
def cmd_verify(args: argparse.Namespace, store: CheckpointStore) -> int:
    report = store.verify(args.step)
    for step in report.steps:
        signature = f" ({step.signature})" if step.signature else ""
        print(f"step {step.step}: {'ok' if step.ok else 'BAD'}{signature}")
        for problem in step.problems:
            print(f"  {problem.path}: {problem.reason}: {problem.detail}")
    if report.ok:
        return 0
    bad = len(report.problems)
    return _fail(args, f"{bad} bad file(s) in step(s) {report.bad_steps} under {store.url}")


@_guarded
def cmd_prune(args: argparse.Namespace, store: CheckpointStore) -> int:
    deleted = store.prune(args.keep, args.every, verify=not args.no_verify)
    print(f"deleted steps: {deleted}" if deleted else "nothing to delete")
    return 0


@_guarded
def cmd_gc(args: argparse.Namespace, store: CheckpointStore) -> int:
    removed = store.gc(args.grace)
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print("nothing to remove")
    return 0


def _select(state: Any, key: str | None) -> Any:
    if key is None:
        return state
    node = state
    walked = []
    for part in key.split("."):
        if not isinstance(node, Mapping):
            raise InvalidArgumentError(f"--key {key!r}: {'.'.join(walked)} is not a dict")
        # Optimizer state has int keys: accept "state.0" for them.
        if part not in node and part.lstrip("-").isdigit() and int(part) in node:
            part = int(part)
        if part not in node:
            keys = ", ".join(map(str, list(node)[:20]))
            raise InvalidArgumentError(f"--key {key!r}: no {part!r} here; keys are: {keys}")
        node = node[part]
        walked.append(str(part))
    if not isinstance(node, Mapping):
        raise InvalidArgumentError(f"--key {key!r} selects a {type(node).__name__}, not a dict")
    return node


def _tensors_only(node: Any) -> Any:
    """The tree with every non-tensor leaf dropped (empty containers too)."""
    import torch

    if isinstance(node, torch.Tensor):
        return node
    if isinstance(node, Mapping):
        out = {k: _tensors_only(v) for k, v in node.items()}
        kept = {k: v for k, v in out.items() if v is not None}
        return kept or None
    if isinstance(node, (list, tuple)):
        kept = [v for v in map(_tensors_only, node) if v is not None]
        return type(node)(kept) if kept else None
    return None


def _count(node: Any) -> tuple[int, int]:
    import torch

    if isinstance(node, torch.Tensor):
        return 1, node.numel() * node.element_size()
    items = node.values() if isinstance(node, Mapping) else node
    totals = [_count(v) for v in items]
    return sum(t for t, _ in totals), sum(b for _, b in totals)


def _check_out(store: CheckpointStore, out: str, force: bool) -> None:
    """Refuse an --out inside the store (it would overwrite checkpoint files, even
    the manifest) and, without --force, one that exists."""
    import fsspec

    if store.contains(out):
        raise InvalidArgumentError(
            f"--out {out!r} is inside the checkpoint location {store.url}; write elsewhere"
        )
    try:
        fs, path = fsspec.core.url_to_fs(out)
        exists, isdir = fs.exists(path), fs.isdir(path)
    except (ValueError, TypeError, ImportError, OSError) as exc:
        raise InvalidArgumentError(f"--out {out!r} cannot be opened: {exc}") from exc
    if isdir:
        raise InvalidArgumentError(f"--out {out!r} is a directory; name a file")
    if exists and not force:
        raise InvalidArgumentError(f"--out {out!r} exists; pass --force to overwrite it")


@_guarded
def cmd_export(args: argparse.Namespace, store: CheckpointStore) -> int:
    _check_out(store, args.out, args.force)
    loaded = store.load_checkpoint(args.step)
    # A sharded run's optimizer state is in the ranks' parts: joined back in.
    state, note = with_full_optimizer(loaded.state, loaded.per_rank)
    if note:
        print(f"note: {note}", file=sys.stderr)
    selected = _tensors_only(_select(state, args.key)) or {}
    tensors, nbytes = _count(selected)
    try:
        import fsspec
        import torch

        with fsspec.open(args.out, "wb") as f:
            torch.save(selected, f)
    except OSError as exc:
        raise StorageError(f"cannot write {args.out!r}: {exc}") from exc
    print(f"exported step {loaded.step}: {tensors} tensor(s), {_human(nbytes)} to {args.out}")
    return 0


def _step(value: str) -> int:
    try:
        step = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"step must be an integer, got {value!r}") from None
    if step < 0:
        raise argparse.ArgumentTypeError(f"step must be >= 0, got {step}")
    return step


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {value!r}") from None
    # NaN compares false with everything: it must not pass as an age.
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value!r}")
    return seconds


def _positive(value: str) -> int:
    n = _step(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def add_ckpt_parser(subparsers: Any) -> None:
    """Add `ckpt` with its subcommands; each sets `func(args) -> exit code`."""
    ckpt = subparsers.add_parser(
        "ckpt", help="list, verify, prune, gc and export checkpoints", description=__doc__
    )
    sub = ckpt.add_subparsers(dest="ckpt_command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, handler: Handler) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("url", help="checkpoint location, any fsspec URL (file://, s3://, ...)")
        p.add_argument(
            "--storage-options",
            metavar="JSON",
            help="fsspec storage options as a JSON object, e.g. '{\"anon\": true}'",
        )
        p.add_argument(
            "--checkpoint-key-file",
            metavar="PATH",
            help="key of signed manifests: refuse unsigned or badly signed ones",
        )
        p.set_defaults(func=handler)
        return p

    p = command("list", "list committed checkpoints", cmd_list)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("verify", "re-read files and check sizes and checksums", cmd_verify)
    p.add_argument("--step", type=_step, help="only this step (default: all committed)")

    p = command("prune", "delete old checkpoints by a retention policy", cmd_prune)
    p.add_argument("--keep", type=_positive, required=True, help="keep the last N")
    p.add_argument("--every", type=_positive, help="also keep every step divisible by K")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="do not read the newest checkpoint back to make sure one good one is kept",
    )

    p = command("gc", "delete leftovers of uncommitted or refused saves", cmd_gc)
    p.add_argument("--grace", type=_seconds, help="age in seconds after which leftovers go")

    p = command("export", "write a plain torch.save state_dict (tensors only)", cmd_export)
    p.add_argument("--step", type=_step, help="step to export (default: newest that verifies)")
    p.add_argument("--key", help="export this sub-dict only, dotted (e.g. model)")
    p.add_argument("--out", required=True, help="output path or URL (not inside URL)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m storage.cli")
    add_ckpt_parser(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
