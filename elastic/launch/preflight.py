"""Checks of a training script before any worker starts.

A torchrun script (``init_process_group()`` reading RANK, WORLD_SIZE, ... from
the environment) started without ``--torchrun-compat`` fails in every worker
with "environment variable RANK expected", and each failure used to be
restarted. Recognised from the source (nothing is executed): it calls
``init_process_group`` and imports nothing from ``elastic``.
"""

from __future__ import annotations

import ast

from ..base.errors import ConfigError


def _uses(tree: ast.AST) -> tuple[bool, bool]:
    inits = imports_elastic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            inits = inits or name == "init_process_group"
        elif isinstance(node, ast.Import):
            imports_elastic = imports_elastic or any(
                a.name.split(".")[0] == "elastic" for a in node.names
            )
        elif isinstance(node, ast.ImportFrom):
            imports_elastic = imports_elastic or (
                node.level == 0 and (node.module or "").split(".")[0] == "elastic"
            )
    return inits, imports_elastic


def is_torchrun_script(source: str) -> bool:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return False  # Python reports that itself, in the worker
    inits, imports_elastic = _uses(tree)
    return inits and not imports_elastic


def torchrun_advice(path: str, nproc: int) -> str:
    return f"re-run with --torchrun-compat, e.g. elastic run --torchrun-compat -n {nproc} {path}"


def check_script(path: str, nproc: int) -> None:
    """Raise ConfigError (one line naming what to do) for a script that cannot run as is."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            source = f.read()
    except OSError as exc:
        raise ConfigError(f"training script {path!r} cannot be read: {exc}") from exc
    if is_torchrun_script(source):
        raise ConfigError(
            f"{path} is a torchrun script (it calls init_process_group() and does not use "
            f"the elastic Trainer): {torchrun_advice(path, nproc)}"
        )


# What torch.distributed's env:// rendezvous raises without torchrun's variables.
_ENV_INIT_FAILURE = "environment variable RANK expected"


def torchrun_failure(stderr_lines: list[str]) -> bool:
    """A worker died in an env:// init_process_group (a torchrun script the scan missed)."""
    return any(_ENV_INIT_FAILURE in line for line in stderr_lines)
