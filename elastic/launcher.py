"""`elastic run`: spawns and supervises local workers (being built)."""

from __future__ import annotations

import argparse


def add_run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a training script on elastic workers")
    p.add_argument("script")
    p.set_defaults(func=lambda args: 2)
