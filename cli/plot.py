"""`fishmerge plot RUN_DIR... --out curves.png`: accuracy and CSB curves of federated runs."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("plot", help="plot held-out accuracy and CSB per round of one or more runs")
    parser.add_argument("runs", nargs="+", type=Path, help="output folders of `fishmerge federate`")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="PNG to write")
    parser.add_argument("--label", action="append", default=None, help="legend label per run (repeat, in order)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fishmerge.federated.plot import plot_runs

    print(plot_runs(args.runs, args.out, args.label))
    return 0
