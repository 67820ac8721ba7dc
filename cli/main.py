"""Entry point of the ``fishmerge`` command: one sub-command per module of this package."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fishmerge import __version__
from fishmerge.errors import FishmergeError

# Each module defines `register(subparsers)`, which adds its sub-command and sets `func` on its parser.
SUBCOMMANDS = ["estimate", "merge", "push", "demo", "federate", "personalize", "pretrain", "plot"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fishmerge",
        description="Fisher-weighted merging of Hugging Face checkpoints and FedFish federated learning.",
    )
    parser.add_argument("--version", action="version", version=f"fishmerge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"fishmerge.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except FishmergeError as err:
        print(f"fishmerge {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
