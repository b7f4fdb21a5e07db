"""`elastic ckpt` (storage.cli): output, exit codes, one-line errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from storage.cli import add_ckpt_parser, main
from tests.storage.testlib import Location, assert_same, rich_state


@pytest.fixture
def ckpt(local_location: Location) -> Location:
    store = local_location.store()
    for step in (10, 20, 30):
        store.save(step, rich_state(step), metadata={"loss": 1.0 / step})
    return local_location


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["ckpt", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_add_ckpt_parser_wires_a_handler_per_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="elastic")
    add_ckpt_parser(parser.add_subparsers(dest="command"))
    for argv in (
        ["list", "file:///x", "--json"],
        ["verify", "file:///x", "--step", "3"],
        ["prune", "file:///x", "--keep", "3", "--every", "10"],
        ["gc", "file:///x"],
        ["export", "file:///x", "--out", "m.pt", "--key", "model"],
    ):
        args = parser.parse_args(["ckpt", *argv])
        assert callable(args.func) and args.ckpt_command == argv[0]


def test_list_prints_one_line_per_committed_step(
    ckpt: Location, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "list", ckpt.url)
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[1] for line in lines] == ["10", "20", "30"]
    assert '"loss": 0.05' in lines[1]


def test_list_json(ckpt: Location, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "list", ckpt.url, "--json")
    assert code == 0
    listed = json.loads(out)
    assert [c["step"] for c in listed] == [10, 20, 30]
    assert listed[0]["metadata"] == {"loss": 0.1} and listed[0]["world_size"] == 1


def test_verify_exits_zero_when_intact_and_one_naming_each_bad_file(
    ckpt: Location, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "verify", ckpt.url)[0] == 0
    bad = ckpt.data_files(20)[0]
    ckpt.flip_bit(bad)
    ckpt.delete(ckpt.data_files(30)[0])
    code, out, err = run(capsys, "verify", ckpt.url)
    assert code == 1
    assert f"{bad}: checksum" in out and "step-000000000030" in out and ": missing:" in out
    assert "2 bad file(s) in step(s) [20, 30]" in err
    assert run(capsys, "verify", ckpt.url, "--step", "10")[0] == 0
    assert run(capsys, "verify", ckpt.url, "--step", "20")[0] == 1


def test_prune_keeps_the_last_n(ckpt: Location, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "prune", ckpt.url, "--keep", "1")
    assert code == 0 and "deleted steps: [10, 20]" in out
    assert [i.step for i in ckpt.store().list()] == [30]


def test_gc_reports_what_it_removed(ckpt: Location, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt.write("step-000000000010/g000007/r00000-dead/data-00000.bin", b"left over")
    code, out, _ = run(capsys, "gc", ckpt.url)
    assert code == 0 and "removed step-000000000010/g000007/r00000-dead/data-00000.bin" in out
    assert run(capsys, "gc", ckpt.url)[1].strip() == "nothing to remove"


def test_export_writes_a_plain_state_dict_loadable_without_pickle(
    ckpt: Location, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_file = tmp_path / "model.pt"
    code, out, _ = run(capsys, "export", ckpt.url, "--key", "model", "--out", str(out_file))
    assert code == 0 and "exported step 30" in out
    exported = torch.load(out_file, weights_only=True)
    assert_same(dict(rich_state(30)["model"]), exported)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))
    model.load_state_dict(exported)


def test_export_of_everything_keeps_tensors_only(
    ckpt: Location, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_file = tmp_path / "all.pt"
    assert run(capsys, "export", ckpt.url, "--step", "20", "--out", str(out_file))[0] == 0
    exported = torch.load(out_file, weights_only=True)
    assert set(exported) == {"model", "optim", "tensors"}  # "plain" held no tensors
    assert_same(
        rich_state(20)["optim"]["state"][0]["exp_avg"], exported["optim"]["state"][0]["exp_avg"]
    )
    assert "param_groups" not in exported["optim"]


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["list", "nosuch://x"], 2, "unknown URL scheme 'nosuch'"),
        (["verify", "{url}", "--step", "7"], 1, "step 7 has no committed checkpoint"),
        (["export", "{url}", "--step", "7", "--out", "{tmp}/x.pt"], 1, "step 7"),
        (["export", "{url}", "--key", "nope", "--out", "{tmp}/x.pt"], 2, "no 'nope' here"),
        (["list", "{url}", "--storage-options", "{{bad"], 2, "not valid JSON"),
    ],
)
def test_errors_are_one_line_on_stderr_with_a_nonzero_exit(
    ckpt: Location,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    argv: list[str],
    code: int,
    message: str,
) -> None:
    argv = [a.format(url=ckpt.url, tmp=tmp_path) for a in argv]
    got, _, err = run(capsys, *argv)
    assert got == code
    assert message in err and len(err.strip().splitlines()) == 1


def test_an_empty_location_is_an_error_for_every_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"file://{tmp_path}/empty"
    for argv in (["list", url], ["verify", url], ["export", url, "--out", f"{tmp_path}/x.pt"]):
        code, _, err = run(capsys, *argv)
        assert code == 1 and "no committed checkpoint" in err and "empty location" in err


def test_runs_as_a_module(ckpt: Location) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "storage.cli", "ckpt", "list", ckpt.url, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert [c["step"] for c in json.loads(done.stdout)] == [10, 20, 30]
