"""Every `elastic ...` line of the deploy recipes parses, with flags that exist."""

from __future__ import annotations

import os

import pytest

from tests.conftest import REPO

from .commands import Command, problem, shell_commands, substitute, yaml_commands

try:
    import yaml
except ModuleNotFoundError:  # pragma: no cover - yaml is in the dev venv
    yaml = None

NEEDS_YAML = pytest.mark.skipif(
    yaml is None, reason="PyYAML is not installed: the Kubernetes recipes cannot be loaded"
)
K8S = os.path.join(REPO, "deploy", "kubernetes")
SBATCH = os.path.join(REPO, "deploy", "slurm", "elastic.sbatch")
DOC = os.path.join(REPO, "docs", "deploy.md")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _yaml_files() -> list[str]:
    return sorted(os.path.join(K8S, n) for n in os.listdir(K8S) if n.endswith(".yaml"))


def _doc_blocks() -> str:
    """The page with every line outside a fenced code block blanked (numbers kept).

    Code blocks only: prose may name a command without its arguments.
    """
    kept, inside = [], False
    for line in _read(DOC).splitlines():
        fence = line.strip().startswith("```")
        kept.append(line if inside and not fence else "")
        inside ^= fence
    return "\n".join(kept)


def _recipe_commands() -> dict[str, list[Command]]:
    found = {
        "slurm": shell_commands(_read(SBATCH), "deploy/slurm/elastic.sbatch"),
        "docs": shell_commands(_doc_blocks(), "docs/deploy.md"),
    }
    if yaml is not None:
        found["kubernetes"] = [
            c
            for path in _yaml_files()
            for c in yaml_commands(yaml.safe_load_all(_read(path)), os.path.relpath(path, REPO))
        ]
    return found


ALL = [c for cmds in _recipe_commands().values() for c in cmds]


def test_each_recipe_holds_the_commands_it_is_for() -> None:
    found = _recipe_commands()
    subcommands = {name: {c.argv[0] for c in cmds} for name, cmds in found.items()}
    assert {"etcd", "run", "ckpt"} <= subcommands["slurm"], found["slurm"]
    assert {"run", "status"} <= subcommands["docs"], found["docs"]
    if yaml is not None:
        assert {"run", "ckpt"} <= subcommands["kubernetes"], found["kubernetes"]


@pytest.mark.parametrize("command", ALL, ids=str)
def test_every_recipe_command_parses_with_existing_flags(command: Command) -> None:
    assert problem(command.argv) is None, f"{command}: {problem(command.argv)}"


@NEEDS_YAML
@pytest.mark.parametrize("path", _yaml_files(), ids=os.path.basename)
def test_kubernetes_recipes_load(path: str) -> None:
    docs = [d for d in yaml.safe_load_all(_read(path)) if d is not None]
    assert docs and all("kind" in d and "apiVersion" in d for d in docs), path


@NEEDS_YAML
def test_workers_reach_every_member_of_the_etcd_cluster() -> None:
    etcd = [
        d
        for d in yaml.safe_load_all(_read(os.path.join(K8S, "etcd.yaml")))
        if d["kind"] == "StatefulSet"
    ][0]
    n, svc = etcd["spec"]["replicas"], etcd["spec"]["serviceName"]
    args = etcd["spec"]["template"]["spec"]["containers"][0]["args"]
    cluster = next(a for a in args if a.startswith("--initial-cluster="))
    assert cluster.split("=", 1)[1] == ",".join(
        f"etcd-{i}=http://etcd-{i}.{svc}:2380" for i in range(n)
    )
    runs = [c for c in _recipe_commands()["kubernetes"] if c.argv[0] == "run"]
    for run in runs:
        endpoints = run.argv[run.argv.index("--etcd") + 1]
        assert endpoints == ",".join(f"http://etcd-{i}.{svc}:2379" for i in range(n)), run


# -- the checks themselves fail on bad lines ------------------------------------------


def test_a_misspelled_flag_fails() -> None:
    (cmd,) = shell_commands("exec elastic run --job j --lease-tl 5 train.py\n", "t")
    assert "--lease-tl" in (problem(cmd.argv) or "")


def test_an_abbreviated_flag_that_argparse_accepts_fails() -> None:
    argv = ("run", "--etcd", "http://e:2379", "--checkpoint-ev", "5", "train.py")
    assert "--checkpoint-ev" in (problem(argv) or "")


def test_the_training_scripts_own_flags_are_not_checked() -> None:
    assert problem(("run", "-n", "2", "train.py", "--lr", "0.1", "--not-ours")) is None


@NEEDS_YAML
def test_a_recipe_with_a_flag_that_does_not_exist_fails() -> None:
    text = _read(os.path.join(K8S, "workers.yaml"))
    assert "--lease-ttl" in text
    broken = yaml_commands(
        yaml.safe_load_all(text.replace("--lease-ttl", "--lease-timeout")), "workers.yaml"
    )
    problems = [problem(c.argv) for c in broken if c.argv[0] == "run"]
    assert problems and all(p and "--lease-timeout" in p for p in problems), problems


def test_shell_lines_are_joined_cut_at_operators_and_placeholders_resolved() -> None:
    text = (
        "# elastic run --in-a-comment\n"
        'elastic etcd --listen "$ETCD_HOST" --port ${ETCD_PORT:-2379} > log 2>&1 &\n'
        "srun -N2 --label \\\n"
        '    elastic run --job "$JOB" -n $(GPUS) $resume train.py || rc=$?\n'
        "srun bash -c 'exec elastic status --job $JOB --etcd $ETCD'\n"
    )
    got = [c.argv for c in shell_commands(text, "t")]
    assert got == [
        ("etcd", "--listen", "10.0.0.1", "--port", "2379"),
        ("run", "--job", "llm-run-1", "-n", "8", "--resume", "train.py"),
        ("status", "--job", "llm-run-1", "--etcd", substitute("$ETCD", "t")),
    ]


@NEEDS_YAML
def test_a_container_argument_list_is_a_command() -> None:
    doc = yaml.safe_load(
        "spec: {containers: [{name: w, command: [elastic],"
        " args: [run, --job, $(JOB), --host, $(POD_IP), train.py]}]}"
    )
    assert [c.argv for c in yaml_commands([doc], "t")] == [
        ("run", "--job", "llm-run-1", "--host", "10.0.0.7", "train.py")
    ]


def test_a_placeholder_without_a_sample_value_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"\$NODES"):
        shell_commands("elastic run -n $NODES train.py\n", "t")
