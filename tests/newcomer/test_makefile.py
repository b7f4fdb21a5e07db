"""`make demo` / `make test` from a fresh clone, as `make -n` plans them, and
.ci/run's exit status (both driven on a copy of the repository's own files)."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import pytest

from .launch import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _clone(tmp_path: Any) -> str:
    root = str(tmp_path / "clone")
    os.makedirs(os.path.join(root, ".ci"))
    for name in ("Makefile", "pyproject.toml", os.path.join(".ci", "run")):
        shutil.copy(os.path.join(REPO, name), os.path.join(root, name))
    return root


def _plan(root: str, target: str) -> list[str]:
    # Under `make test` (as CI runs the suite) MAKELEVEL and MAKEFLAGS are
    # inherited and a nested make prints "Entering directory" lines; the plan
    # must be the one a user's own shell gets.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")
    }
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", target],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.parametrize("target", ["test", "demo"])
def test_a_fresh_clone_creates_the_venv_with_torch_pinned_first(tmp_path: Any, target: str) -> None:
    plan = _plan(_clone(tmp_path), target)
    text = "\n".join(plan)
    assert plan[0] == "test -x .venv/bin/python || python3 -m venv .venv"
    torch = next(i for i, ln in enumerate(plan) if "pip install --quiet torch==2.13.0" in ln)
    project = next(i for i, ln in enumerate(plan) if "pip install --quiet -e '.[dev]'" in ln)
    assert torch < project  # else pip resolves an unpinned (CUDA) torch for the project
    assert "touch .venv/.installed" in text
    if target == "test":
        assert plan[-1] == ".venv/bin/python -m pytest -q"
    else:
        assert any(ln.startswith(".venv/bin/elastic run -n 3") for ln in plan)
        assert plan[-1].startswith(".venv/bin/elastic plot elastic-demo.events.jsonl")


def test_an_installed_venv_is_not_installed_again(tmp_path: Any) -> None:
    root = _clone(tmp_path)
    os.makedirs(os.path.join(root, ".venv"))
    open(os.path.join(root, ".venv", ".installed"), "w").close()  # newer than pyproject.toml
    assert _plan(root, "test") == [".venv/bin/python -m pytest -q"]


@pytest.mark.parametrize(("failing", "expected"), [("", 0), ("test", 2), ("venv", 2)])
def test_ci_runs_make_venv_lint_and_test_and_fails_when_one_fails(
    tmp_path: Any, failing: str, expected: int
) -> None:
    root = _clone(tmp_path)
    # A stand-in for what `make venv` would install: ruff that passes.
    os.makedirs(os.path.join(root, ".venv", "bin"))
    ruff = os.path.join(root, ".venv", "bin", "ruff")
    with open(ruff, "w") as f:
        f.write('#!/bin/sh\necho ruff "$@" >> calls\n')
    os.chmod(ruff, 0o755)
    # Make targets replaced by recorders; the one named `failing` fails.
    with open(os.path.join(root, "Makefile"), "w") as f:
        for target in ("venv", "test", "lint"):
            f.write(
                f"{target}:\n\techo make {target} >> calls\n"
                + ("\texit 1\n" if target == failing else "")
            )
    done = subprocess.run(
        ["bash", os.path.join(root, ".ci", "run")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == expected, done.stderr
    calls = open(os.path.join(root, "calls")).read().splitlines()
    full = ["make venv", "ruff check .", "ruff format --check .", "make test"]
    assert calls == (full if not failing else full[: full.index(f"make {failing}") + 1])
