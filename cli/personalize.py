"""`fishmerge personalize RUN_DIR`: personalization evaluation of a federated run's latest global model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "personalize",
        help="fine-tune the global model briefly on each evaluation client and report pre/post metrics",
        description="For each evaluation client: evaluate the run's latest global model on the last 20%% of its "
        "examples, fine-tune a copy on the first 80%% with the client optimizer, evaluate again. Writes "
        "per-client rows and a summary (mean, median, quartiles) under RUN_DIR/personalization/.",
    )
    parser.add_argument("run_dir", type=Path, help="output folder of `fishmerge federate`")
    parser.add_argument("--split", choices=["heldout", "test"], default=None, help="evaluation clients (default: config)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fishmerge.federated.driver import personalize_run

    summary = personalize_run(args.run_dir, args.split)
    print(json.dumps(summary, indent=2))
    return 0
