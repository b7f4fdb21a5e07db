"""The README's training script runs as shown: `elastic run -n 2 train.py` finishes."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import torch

from .harness import REPO


def readme_script() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## Writing a training script") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README has no python block under 'Writing a training script'"
    return match.group(1)


def test_the_readme_training_script_runs_under_elastic_run(tmp_path) -> None:
    script = tmp_path / "train.py"
    # Fewer epochs than the README's 3 keep the test short; nothing else changes.
    source = readme_script().replace("epochs=3", "epochs=1")
    assert "epochs=1" in source
    script.write_text(source)
    proc = subprocess.Popen(
        [sys.executable, "-m", "elastic.cli", "run", "-n", "2", str(script)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)
    assert proc.returncode == 0, out[-3000:]
    finals = glob.glob(str(tmp_path / "final-*.pt"))
    assert len(finals) == 2, out[-3000:]  # both workers trained to the last step
    a, b = (torch.load(p, weights_only=True) for p in finals)
    assert all(torch.equal(a[k], b[k]) for k in a)
