"""`elastic chaos` on bad input: one clear line naming the bad value, non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from chaos import scenarios as sc
from elastic.cli import main


def elastic(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_the_installed_command_lists_scenarios() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "elastic.cli", "chaos", "list"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    for name in sc.SCENARIOS:
        assert name in out.stdout
    assert out.stdout.count("[smoke]") == len(sc.smoke())


def test_list_with_a_seed_prints_that_seeds_schedule_as_json(capsys) -> None:
    code, out, _ = elastic(capsys, "chaos", "list", "--seed", "4", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["kill-worker"]["schedule"] == sc.SCENARIOS["kill-worker"].schedule(4).describe()


def test_list_kinds_describes_every_registered_kind(capsys) -> None:
    from chaos.spec import KINDS

    code, out, _ = elastic(capsys, "chaos", "list", "--kinds", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == set(KINDS)
    assert rows["link-down"]["duration"] == "how long the link stays down"
    assert rows["kill-host"]["needs_rank"] and rows["kill-host"]["expects"]
    code, out, _ = elastic(capsys, "chaos", "list", "--kinds")
    assert code == 0 and all(name in out for name in KINDS)
    assert "expects: a worker it started is in a World" in out


def test_unknown_scenario_is_refused_by_name(capsys, tmp_path) -> None:
    code, _, err = elastic(
        capsys, "chaos", "run", "--scenario", "kill-wroker", "--report", str(tmp_path)
    )
    assert code != 0
    assert "unknown scenario 'kill-wroker'" in err
    assert "kill-worker" in err  # the known names are listed
    assert len(err.strip().splitlines()) == 1
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("value", ["0", "-2", "three"])
def test_seeds_below_one_are_refused(capsys, tmp_path, value: str) -> None:
    code, _, err = elastic(
        capsys,
        "chaos",
        "run",
        "--scenario",
        "kill-worker",
        "--seeds",
        value,
        "--report",
        str(tmp_path),
    )
    assert code != 0
    assert "--seeds" in err and value in err


def test_unwritable_report_directory_is_refused(capsys, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    target = blocker / "report"
    code, _, err = elastic(
        capsys, "chaos", "run", "--scenario", "kill-worker", "--report", str(target)
    )
    assert code != 0
    assert str(target) in err and "not writable" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_report_directory_is_refused(capsys, tmp_path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    code, _, err = elastic(capsys, "chaos", "run", "--smoke", "--report", str(ro))
    assert code != 0 and "not writable" in err


def test_scenario_all_and_smoke_are_exclusive(capsys, tmp_path) -> None:
    code, _, err = elastic(capsys, "chaos", "run", "--all", "--smoke", "--report", str(tmp_path))
    assert code != 0 and "not allowed with" in err


def test_the_chaos_cli_and_package_load_without_torch() -> None:
    # `elastic status` and friends import chaos.runner to build the parser: no torch.
    code = (
        "import sys, chaos, elastic.cli; elastic.cli.build_parser(); "
        "assert chaos.SCENARIOS and chaos.Suite; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_scenario_that_cuts_a_link_is_refused_without_hosts(capsys, tmp_path) -> None:
    rc, _, err = elastic(
        capsys, "chaos", "run", "--scenario", "link-down", "--report", str(tmp_path / "r")
    )
    assert rc == 2
    assert "link-down" in err and "--hosts" in err and "Traceback" not in err


def test_one_host_is_not_a_test_bed(capsys, tmp_path) -> None:
    rc, _, err = elastic(
        capsys, "chaos", "run", "--hosts", "1", "--smoke", "--report", str(tmp_path / "r")
    )
    assert rc == 2
    assert "--hosts" in err and "2 or more" in err
