"""Shared command-line options of the examples."""

from __future__ import annotations

import argparse
import os
import time

import torch


def base_parser(description: str, *, steps: int, batch: int, lr: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch, help="global batch size")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--step-time",
        type=float,
        default=0.0,
        help="extra seconds per step, to stand in for a bigger model",
    )
    p.add_argument("--out", default=None, help="write final parameters here (torch.save)")
    return p


def slow_down(seconds: float) -> None:
    # Simulated compute time (see --step-time), not a synchronisation.
    if seconds > 0:
        time.sleep(seconds)


def finish(result, model: torch.nn.Module, out: str | None) -> int:
    # Only a member that trained to the last step writes (a worker that joined a
    # finished job holds untrained parameters). Every such member holds the same
    # parameters; each writes a private file and renames it over `out`, so
    # concurrent writers never leave a torn file.
    if out and result.final:
        tmp = f"{out}.{os.getpid()}.tmp"
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, out)
    # No result line here: each worker would print one; the launcher prints one
    # summary of the run (steps, final loss, failures, checkpoints).
    return result.exit_code
