"""Nonsense on the command line: every case is refused with a message, never a traceback.

The cases are generated from the real argument parser: for every numeric
option of every command, values that no setting can mean (not a number,
NaN, infinities, negative, fractional counts, empty); for every path or URL
option, strings that point nowhere useful (``..`` paths, unicode, a file
where a directory belongs, a directory where a file belongs, huge strings).
Commands run in-process up to the point where they would start something
(a launcher, an etcd, a chaos suite, a connection): reaching that point is
"accepted". A numeric nonsense value must never be accepted; no case may
raise anything but a clean exit with one error line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random

import pytest

from elastic import cli

SEED = 20261202
BAD_FLOATS = ["nan", "inf", "-inf", "-1", "-0.5", "abc", "", "1e400", "0x", "--"]
BAD_INTS = ["-1", "1.5", "abc", "", "nan", "1e3", "-99999999999999999999"]
# Positive-only counts and times: 0 is nonsense for these (a TTL, a timeout,
# a worker count), but a valid value for some others (e.g. --settle 0).
ZERO_OK = {
    "settle",
    "checkpoint_every",
    "max_restarts",
    "first_seed",
    "seed",
    "grace",
    "delay",
    "step",
    "every",
    "servers",  # --servers 0: no server processes (the default)
}


# Any whole number is a seed.
ANY_INT = {"seed", "first_seed"}


class Started(Exception):
    """The command got past its checks and would start something now."""


@pytest.fixture
def stopped_before_starting(monkeypatch):
    from elastic.coord import etcd
    from elastic.launch import launcher

    def started(*_a, **_k):
        raise Started

    monkeypatch.setattr(launcher.ElasticLauncher, "run", started)
    monkeypatch.setattr(launcher, "_run_torchrun_compat", started)
    monkeypatch.setattr(etcd.EmbeddedEtcd, "start", started)
    monkeypatch.setattr(cli, "connect", started, raising=False)
    try:
        import chaos.runner as runner
        import chaos.soak as soak

        monkeypatch.setattr(runner.Suite, "run", started)
        monkeypatch.setattr(soak, "run_soak", started)
    except ImportError:
        pass
    try:
        import storage.cli as scli

        monkeypatch.setattr(scli, "CheckpointStore", started, raising=False)
    except ImportError:
        pass


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(argv prefix, parser) for every leaf command."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _commands(sub, (*prefix, name))


def _kind(action: argparse.Action) -> str | None:
    name = getattr(action.type, "__name__", "")
    if action.type is int or name in ("_step", "_positive", "count", "count_or_zero", "port"):
        return "int"
    if action.type is float or name in (
        "_seconds",
        "seconds",
        "seconds_or_zero",
        "factor",
        "positive",
    ):
        return "float"
    return None


def _base_argv(command: tuple[str, ...], parser: argparse.ArgumentParser, d: str) -> list[str]:
    """A command line that passes argparse: required options and positionals filled."""
    argv = list(command)
    for a in parser._actions:
        if a.required and a.option_strings:
            argv += [a.option_strings[0], _sample(a, d)]
    for a in parser._actions:
        if not a.option_strings and a.dest not in ("help",) and a.nargs != argparse.REMAINDER:
            argv.append(_sample(a, d))
    return argv


def _sample(a: argparse.Action, d: str) -> str:
    if a.dest in ("script",):
        path = os.path.join(d, "train.py")
        with open(path, "w") as f:
            f.write("pass\n")
        return path
    if a.dest == "etcd":
        return "http://127.0.0.1:9"
    if a.dest in ("url",):
        return f"file://{d}/store"
    if a.dest == "job":
        return "fuzzjob"
    kind = _kind(a)
    return "1" if kind else os.path.join(d, "out.pt")


def _cases(d: str) -> list[tuple[list[str], str | None]]:
    """(argv, the option given nonsense if numeric) for every command."""
    rng = random.Random(SEED)
    parser = cli.build_parser()
    cases = []
    strings = [
        "../../../../etc/passwd",
        "ünïcødé\u202e",
        "x" * 5000,
        d,
        os.path.join(d, "f"),
        "",
        "http://",
        "memory://x",
        "file:///nonexistent/dir/x",
        "s3://",
        "\x00",
    ]
    for command, sub in _commands(parser):
        base = _base_argv(command, sub, d)
        for a in sub._actions:
            if not a.option_strings or a.nargs == 0 or a.dest == "help":
                continue
            kind = None if a.dest in ANY_INT else _kind(a)
            flag = a.option_strings[-1]
            if kind == "float":
                pool = BAD_FLOATS + ([] if a.dest in ZERO_OK else ["0"])
            elif kind == "int":
                pool = BAD_INTS + ([] if a.dest in ZERO_OK else ["0"])
            elif a.choices:
                pool = ["no-such-choice", ""]
            else:
                pool = rng.sample(strings, 4)
            for value in pool:
                cases.append(
                    (
                        [*base[: len(command)], flag, value, *base[len(command) :]],
                        flag if kind else None,
                    )
                )
    return cases


def _run(argv: list[str]) -> tuple[str, int | None, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.main(argv)
        except Started:
            return "started", None, err.getvalue()
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:  # what a user would see as a traceback
            return "raised", None, f"Traceback: {type(exc).__name__}: {exc}"
    return "exited", rc, err.getvalue()


def test_nonsense_arguments_are_refused_with_one_line(
    tmp_path, stopped_before_starting, monkeypatch
):
    d = str(tmp_path)
    with open(os.path.join(d, "f"), "w") as f:
        f.write("a file, not a directory")
    victim = os.path.join(d, "out.pt")
    with open(victim, "wb") as f:
        f.write(b"precious")
    monkeypatch.chdir(d)
    cases = _cases(d)
    assert len(cases) > 300, len(cases)  # the count README states is from this run
    problems = []
    for argv, numeric_flag in cases:
        outcome, rc, err = _run(argv)
        if "Traceback" in err:
            problems.append((argv, "traceback", err[-300:]))
        elif outcome == "started" and numeric_flag is not None:
            problems.append((argv, f"accepted nonsense for {numeric_flag}", ""))
        elif outcome == "exited" and rc == 0 and numeric_flag is not None:
            problems.append((argv, "exit 0 on nonsense", err[-300:]))
        elif outcome == "exited" and rc != 0 and "error:" not in err:
            problems.append((argv, f"exit {rc} without an error line", err[-300:]))
    with open(victim, "rb") as f:
        assert f.read() == b"precious", "a case overwrote an existing file"
    print(f"{len(cases)} command-line cases")
    assert not problems, "\n".join(
        f"{' '.join(map(repr, a))}: {w} {e}" for a, w, e in problems[:15]
    )
