"""The ``elastic ...`` command lines of the deploy recipes, and whether each is valid.

Recipes are shell scripts (the sbatch script, code blocks in docs/deploy.md,
a container's ``sh -c`` script) and Kubernetes YAML (a container's
``command`` + ``args`` list). Placeholders (``$VAR``, ``${VAR:-x}``,
``$(VAR)`` of the kubelet or a shell command substitution) are replaced by
sample values before parsing; one without a sample is an error, so a new
placeholder cannot slip through unparsed.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from elastic.cli import build_parser

SAMPLES: Mapping[str, str] = {
    "JOB": "llm-run-1",
    "ETCD": "http://etcd-0.etcd:2379,http://etcd-1.etcd:2379,http://etcd-2.etcd:2379",
    "CHECKPOINT": "s3://bucket/run",
    "CHECKPOINT_EVERY": "500",
    "GPUS": "8",
    "GPUS_PER_NODE": "8",
    "POD_IP": "10.0.0.7",
    "ETCD_HOST": "10.0.0.1",
    "ETCD_PORT": "2379",
    "TRAIN": "train.py",
    "LOG_DIR": "/shared/elastic-logs/123",
    "resume": "--resume",
}

_SHELLS = {"sh", "bash", "dash"}
_OPERATOR = re.compile(r"^[();<>|&]+$")
_PLACEHOLDER = re.compile(
    r"\$\((?P<sub>[^()]*)\)"  # $(VAR) or $(command)
    r"|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:[:]?[-=+?][^}]*)?\}"  # ${VAR}, ${VAR:-x}
    r"|\$(?P<plain>[A-Za-z_][A-Za-z0-9_]*)"  # $VAR
)
_FD_REDIRECT = re.compile(r"(?<=\s)\d+(?=[<>])")
_MENTIONS = re.compile(r"(?:^|[\s;&|(])(?:\S*/)?elastic\s")


@dataclass(frozen=True)
class Command:
    source: str
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.source}: elastic {shlex.join(self.argv)}"


def substitute(text: str, source: str, samples: Mapping[str, str] = SAMPLES) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group("sub") or match.group("braced") or match.group("plain")
        if name not in samples:
            raise ValueError(f"{source}: no sample value for placeholder {match.group(0)!r}")
        return samples[name]

    return _PLACEHOLDER.sub(value, text)


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    start, parts = 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if not parts:
            start = number
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        parts.append(line)
        joined = " ".join(parts)
        parts = []
        if not joined.lstrip().startswith("#"):
            yield start, joined
    if parts:
        yield start, " ".join(parts)


def _tokens(line: str) -> list[str]:
    # The descriptor of a redirection (2>&1) is glued to it; the tokens lose
    # that, so drop it here rather than take it for an argument.
    lex = shlex.shlex(_FD_REDIRECT.sub("", line), posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def _argv_after(tokens: list[str], i: int) -> tuple[str, ...]:
    argv: list[str] = []
    for j in range(i + 1, len(tokens)):
        if _OPERATOR.match(tokens[j]):
            break
        argv.append(tokens[j])
    return tuple(argv)


def _is_elastic(word: str) -> bool:
    return os.path.basename(word) == "elastic"


def shell_commands(text: str, source: str, samples: Mapping[str, str] = SAMPLES) -> list[Command]:
    found: list[Command] = []
    for number, line in _logical_lines(text):
        if not _MENTIONS.search(line + " "):
            continue
        where = f"{source}:{number}"
        tokens = _tokens(substitute(line, where, samples))
        for i, token in enumerate(tokens):
            if _is_elastic(token):
                found.append(Command(where, _argv_after(tokens, i)))
            elif i and tokens[i - 1] == "-c" and "elastic" in token:
                found.extend(shell_commands(token, where, samples))
    return found


def _containers(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


def yaml_commands(
    docs: Iterable[Any], source: str, samples: Mapping[str, str] = SAMPLES
) -> list[Command]:
    found: list[Command] = []
    for doc in docs:
        for container in _containers(doc):
            listed = (container.get("command") or []) + (container.get("args") or [])
            argv = [str(a) for a in listed]
            where = f"{source}: container {container.get('name')}"
            if not argv:
                continue
            if os.path.basename(argv[0]) in _SHELLS and "-c" in argv[:-1]:
                found.extend(shell_commands(argv[argv.index("-c") + 1], where, samples))
            elif _is_elastic(argv[0]):
                found.append(Command(where, tuple(substitute(a, where, samples) for a in argv[1:])))
    return found


def _option_strings(parser: Any) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def problem(argv: tuple[str, ...]) -> str | None:
    """Why ``elastic argv`` is not a valid command line, or None.

    argparse accepts an unambiguous prefix of a flag (``--checkpoint-ev``), so
    besides parsing, every flag must be spelled out as the parser defines it.
    """
    parser = build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(list(argv))
    except SystemExit:
        lines = err.getvalue().strip().splitlines()
        return lines[-1] if lines else "the parser exited"
    sub_at = argv.index(args.command)
    choices = parser._subparsers._group_actions[0].choices
    known = _option_strings(parser) | _option_strings(choices[args.command])
    tail = len(getattr(args, "script_args", None) or [])  # the training script's own flags
    for token in (*argv[:sub_at], *argv[sub_at + 1 : len(argv) - tail]):
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
        elif token.startswith("-") and len(token) > 1 and not token[1].isdigit():
            flag = token[:2]
        else:
            continue
        if flag not in known:
            return f"elastic {args.command}: no flag {flag} (only an abbreviation of one?)"
    return None
